package org.hollowexport.core

import org.junit.Assert.assertEquals
import org.junit.Test

class JsonTest {
    @Test
    fun floatsAreWrittenAsPythonReprWritesThem() {
        val values = listOf(1e-05, 0.0001, 4.0, 1e16, 123.456, -0.5, 1e15, 0.1 + 0.2, 1.0 / 3)
        assertEquals("1e-05, 0.0001, 4.0, 1e+16, 123.456, -0.5, 1000000000000000.0, 0.30000000000000004, " +
                "0.3333333333333333", values.joinToString(", ") { Json.pyFloat(it) })
        assertEquals("NaN", Json.pyFloat(Double.NaN))
    }

    @Test
    fun compactSortedIsPythonsDumps() {
        val v = linkedMapOf<String, Any?>("b" to listOf(1, 2), "a" to "x\u00e9\"", "c" to null, "d" to true)
        assertEquals("{\"a\": \"x\\u00e9\\\"\", \"b\": [1, 2], \"c\": null, \"d\": true}", Json.compact(v, sortKeys = true))
        assertEquals("{\n  \"b\": [\n    1,\n    2\n  ],\n  \"e\": {}\n}",
                Json.pretty(linkedMapOf<String, Any?>("b" to listOf(1, 2), "e" to emptyMap<String, Any>())))
    }

    @Test
    fun codePointOrderIsPythonsStringOrder() {
        val names = listOf("b.png", "B.png", "a10.png", "a2.png", "\uD83D\uDE00.png", "\uFF5E.png")
        assertEquals(listOf("B.png", "a10.png", "a2.png", "b.png", "\uFF5E.png", "\uD83D\uDE00.png"),
                names.sortedWith(CodePointOrder))
    }
}
