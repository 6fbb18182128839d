package org.hollowexport.core

import com.google.gson.JsonArray
import com.google.gson.JsonElement
import com.google.gson.JsonObject
import com.google.gson.JsonParseException
import com.google.gson.JsonParser
import java.math.BigDecimal

/**
 * JSON in and out. Parsing is Gson's; writing is our own so the bytes are under control:
 * the buffer header must be byte-identical to the Python reference (`json.dumps(sort_keys=True)`,
 * separators ", " and ": ", ASCII only), and progress.json / lora.json follow `store.write_json`
 * (two-space indent, insertion order).
 *
 * Values written: null, Boolean, String, Int, Long, Float, Double, Map<String, *> (insertion
 * order, or sorted with sortKeys), List<*>, IntArray, LongArray, and [Raw] (pre-formatted JSON).
 */
object Json {
    /** Text that is already JSON (e.g. a number exactly as it appeared in the manifest). */
    class Raw(val text: String)

    fun parse(text: String, what: String): JsonElement = try {
        JsonParser.parseString(text)
    } catch (err: JsonParseException) {
        throw HollowException("$what is not valid JSON (${err.message})", err)
    }

    fun parseObject(text: String, what: String): JsonObject {
        val value = parse(text, what)
        if (!value.isJsonObject) throw HollowException("$what is not a JSON object")
        return value.asJsonObject
    }

    /** One line, Python's default separators (", ", ": "): what `json.dumps` writes. */
    fun compact(value: Any?, sortKeys: Boolean = false): String {
        val out = StringBuilder()
        write(out, value, sortKeys, null, 0, ", ", ": ")
        return out.toString()
    }

    /** No spaces at all: the safetensors header style. */
    fun tight(value: Any?): String {
        val out = StringBuilder()
        write(out, value, false, null, 0, ",", ":")
        return out.toString()
    }

    /** Indented like `json.dumps(value, indent=2)` (Python's separators: "," at line ends, ": "). */
    fun pretty(value: Any?, indent: Int = 2): String {
        val out = StringBuilder()
        write(out, value, false, indent, 0, ",", ": ")
        return out.toString()
    }

    private fun write(out: StringBuilder, value: Any?, sortKeys: Boolean, indent: Int?, depth: Int,
                      itemSep: String, keySep: String) {
        when (value) {
            null -> out.append("null")
            is Raw -> out.append(value.text)
            is Boolean -> out.append(if (value) "true" else "false")
            is String -> quote(out, value)
            is Int, is Long, is Short, is Byte -> out.append(value.toString())
            is Float -> out.append(pyFloat(value.toDouble()))
            is Double -> out.append(pyFloat(value))
            is IntArray -> writeList(out, value.toList(), sortKeys, indent, depth, itemSep, keySep)
            is LongArray -> writeList(out, value.toList(), sortKeys, indent, depth, itemSep, keySep)
            is List<*> -> writeList(out, value, sortKeys, indent, depth, itemSep, keySep)
            is Map<*, *> -> {
                val keys = value.keys.map { it as String }
                val ordered = if (sortKeys) keys.sortedWith(CodePointOrder) else keys
                if (ordered.isEmpty()) {
                    out.append("{}")
                    return
                }
                out.append('{')
                ordered.forEachIndexed { i, key ->
                    if (i > 0) out.append(itemSep)
                    newline(out, indent, depth + 1)
                    quote(out, key)
                    out.append(keySep)
                    write(out, value[key], sortKeys, indent, depth + 1, itemSep, keySep)
                }
                newline(out, indent, depth)
                out.append('}')
            }
            else -> throw IllegalArgumentException("cannot write ${value.javaClass} as JSON")
        }
    }

    private fun writeList(out: StringBuilder, items: List<*>, sortKeys: Boolean, indent: Int?, depth: Int,
                          itemSep: String, keySep: String) {
        if (items.isEmpty()) {
            out.append("[]")
            return
        }
        out.append('[')
        items.forEachIndexed { i, item ->
            if (i > 0) out.append(itemSep)
            newline(out, indent, depth + 1)
            write(out, item, sortKeys, indent, depth + 1, itemSep, keySep)
        }
        newline(out, indent, depth)
        out.append(']')
    }

    private fun newline(out: StringBuilder, indent: Int?, depth: Int) {
        if (indent == null) return
        out.append('\n')
        for (i in 0 until indent * depth) out.append(' ')
    }

    /** Python's `json.dumps` string escaping with ensure_ascii=True. */
    fun quote(out: StringBuilder, s: String) {
        out.append('"')
        for (c in s) {
            when (c) {
                '"' -> out.append("\\\"")
                '\\' -> out.append("\\\\")
                '\n' -> out.append("\\n")
                '\r' -> out.append("\\r")
                '\t' -> out.append("\\t")
                '\b' -> out.append("\\b")
                '\u000C' -> out.append("\\f")
                else -> if (c < ' ' || c > '\u007f') {
                    out.append(String.format("\\u%04x", c - '\u0000'))
                } else {
                    out.append(c)
                }
            }
        }
        out.append('"')
    }

    /**
     * A double as Python's `repr` writes it (fixed notation for exponents -4..15, else "1e-05").
     * NaN and infinities as Python's json module writes them (NaN, Infinity), which it reads back.
     */
    fun pyFloat(d: Double): String {
        if (d.isNaN()) return "NaN"
        if (d.isInfinite()) return if (d > 0) "Infinity" else "-Infinity"
        if (d == 0.0) return if (1.0 / d < 0) "-0.0" else "0.0"
        val decimal = BigDecimal(java.lang.Double.toString(d)).stripTrailingZeros()
        val digits = decimal.unscaledValue().abs().toString()
        val exponent = digits.length - 1 - decimal.scale()  // d = d1.d2d3... * 10^exponent
        val sign = if (d < 0) "-" else ""
        if (exponent < -4 || exponent >= 16) {
            val mantissa = if (digits.length == 1) digits else digits[0] + "." + digits.substring(1)
            val e = if (exponent < 0) "-" + pad2(-exponent) else "+" + pad2(exponent)
            return sign + mantissa + "e" + e
        }
        val plain = decimal.abs().toPlainString()
        return sign + if (plain.contains('.')) plain else "$plain.0"
    }

    private fun pad2(n: Int): String = if (n < 10) "0$n" else n.toString()

    // ---- reading helpers with messages that name the field

    fun obj(o: JsonObject, key: String, where: String): JsonObject {
        val v = o.get(key)
        if (v == null || !v.isJsonObject) throw HollowException("$where lacks the object \"$key\"")
        return v.asJsonObject
    }

    fun str(o: JsonObject, key: String, where: String): String {
        val v = o.get(key)
        if (v == null || !v.isJsonPrimitive) throw HollowException("$where lacks the field \"$key\"")
        return v.asString
    }

    fun optStr(o: JsonObject, key: String): String? {
        val v = o.get(key)
        return if (v == null || v.isJsonNull) null else v.asString
    }

    fun long(o: JsonObject, key: String, where: String): Long {
        val v = o.get(key)
        if (v == null || !v.isJsonPrimitive || !v.asJsonPrimitive.isNumber) {
            throw HollowException("$where lacks the number \"$key\"")
        }
        return BigDecimal(v.asString).longValueExact()
    }

    fun int(o: JsonObject, key: String, where: String): Int = Math.toIntExact(long(o, key, where))

    fun double(o: JsonObject, key: String, where: String): Double {
        val v = o.get(key)
        if (v == null || !v.isJsonPrimitive || !v.asJsonPrimitive.isNumber) {
            throw HollowException("$where lacks the number \"$key\"")
        }
        return v.asDouble
    }

    fun ints(o: JsonObject, key: String, where: String): IntArray {
        val v = o.get(key)
        if (v == null || !v.isJsonArray) throw HollowException("$where lacks the list \"$key\"")
        val array: JsonArray = v.asJsonArray
        return IntArray(array.size()) { BigDecimal(array.get(it).asString).intValueExact() }
    }

    /** The literal text of a JSON number or string as it appears in the file (Python's str() of it). */
    fun literal(o: JsonObject, key: String, where: String): String {
        val v = o.get(key)
        if (v == null || !v.isJsonPrimitive) throw HollowException("$where lacks the field \"$key\"")
        return v.asString
    }
}

/** Python's string order (by code point), so sorted file names and keys agree with the reference. */
object CodePointOrder : Comparator<String> {
    override fun compare(a: String, b: String): Int {
        var i = 0
        var j = 0
        while (i < a.length && j < b.length) {
            val ca = a.codePointAt(i)
            val cb = b.codePointAt(j)
            if (ca != cb) return if (ca < cb) -1 else 1
            i += Character.charCount(ca)
            j += Character.charCount(cb)
        }
        val ra = a.length - i
        val rb = b.length - j
        return if (ra == rb) 0 else if (ra < rb) -1 else 1
    }
}
