package org.hollowexport.core

import org.junit.Assert.assertEquals
import org.junit.Test

class HalfTest {
    private fun f(bits: Int) = java.lang.Float.intBitsToFloat(bits)

    @Test
    fun roundsToNearestEven() {
        assertEquals(0x3c00, Half.fromFloat(1.0f))
        assertEquals(0xc000, Half.fromFloat(-2.0f))
        assertEquals(0x7bff, Half.fromFloat(65504f))
        assertEquals(0x7bff, Half.fromFloat(65519.99f))
        assertEquals(0x7c00, Half.fromFloat(65520f))
        assertEquals(0x0001, Half.fromFloat(f(0x33800000)))  // 2^-24, the smallest subnormal
        assertEquals(0x0000, Half.fromFloat(f(0x33000000)))  // 2^-25: a tie, rounds to even 0
        assertEquals(0x0002, Half.fromFloat(3 * f(0x33000000)))  // 1.5 units: tie to even 2
        assertEquals(0x0400, Half.fromFloat(f(0x38800000)))  // 2^-14, the smallest normal
        assertEquals(0x3c00, Half.fromFloat(1f + f(0x3a000000)))  // 1 + 2^-11: tie, to even
        assertEquals(0x3c02, Half.fromFloat(1f + 3 * f(0x3a000000)))  // 1 + 3*2^-11: tie, to even (up)
        assertEquals(0x8000, Half.fromFloat(-0.0f))
        assertEquals(0xfc00, Half.fromFloat(Float.NEGATIVE_INFINITY))
        assertEquals(0x7c00, Half.fromFloat(Float.NaN) and 0x7c00)
        assert(Half.toFloat(Half.fromFloat(Float.NaN)).isNaN())
    }

    @Test
    fun everyHalfRoundTrips() {
        for (h in 0 until 65536) {
            if ((h and 0x7c00) == 0x7c00 && (h and 0x3ff) != 0) continue  // NaN payloads
            assertEquals("half $h", h, Half.fromFloat(Half.toFloat(h)))
        }
    }
}
