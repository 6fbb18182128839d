package org.hollowexport.core

/**
 * IEEE 754 binary16 conversions (round to nearest, ties to even), as numpy's astype(float16).
 * Buffers may store noise and hidden states as float16 (PROTOCOL.md section 4).
 */
object Half {
    /** float32 -> binary16 bits (in the low 16 bits of the Int). */
    fun fromFloat(f: Float): Int {
        val bits = java.lang.Float.floatToRawIntBits(f)
        val sign = (bits ushr 16) and 0x8000
        val abs = bits and 0x7fffffff
        if (abs >= 0x7f800000) {  // infinity or NaN (NaN keeps the top of its payload, stays NaN)
            return if (abs == 0x7f800000) sign or 0x7c00 else sign or 0x7e00 or ((abs ushr 13) and 0x3ff)
        }
        if (abs >= 0x477ff000) return sign or 0x7c00  // >= 65520 rounds to infinity
        if (abs < 0x38800000) {  // below 2^-14: a subnormal half (or zero); units of 2^-24, exact scaling
            val m = Math.rint(java.lang.Float.intBitsToFloat(abs).toDouble() * 16777216.0).toInt()
            return sign or m  // m == 1024 is the smallest normal, which is the right bit pattern
        }
        val exponent = (abs ushr 23) - 127 + 15
        val mantissa = abs and 0x7fffff
        var half = (exponent shl 10) or (mantissa ushr 13)
        val rest = mantissa and 0x1fff
        if (rest > 0x1000 || (rest == 0x1000 && (half and 1) == 1)) half++  // carries into the exponent
        return sign or half
    }

    /** binary16 bits -> float32 (exact). */
    fun toFloat(h: Int): Float {
        val sign = (h and 0x8000) shl 16
        val exponent = (h ushr 10) and 0x1f
        val mantissa = h and 0x3ff
        val bits = when {
            exponent == 0 -> {
                if (mantissa == 0) return java.lang.Float.intBitsToFloat(sign)
                val v = mantissa.toFloat() * (1.0f / 16777216.0f)
                return if (sign != 0) -v else v
            }
            exponent == 31 -> sign or 0x7f800000 or (mantissa shl 13)
            else -> sign or ((exponent - 15 + 127) shl 23) or (mantissa shl 13)
        }
        return java.lang.Float.intBitsToFloat(bits)
    }

    /** Round a float32 value through float16 and back (what a float16 buffer stores). */
    fun round(f: Float): Float = toFloat(fromFloat(f))
}
