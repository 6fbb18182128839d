package org.hollowexport.core

/**
 * PROTOCOL.md section 2: counter-based SplitMix64. Every value is a function of (seed, stream,
 * index, position) only, so a resumed run draws what an uninterrupted one would, and the Python
 * reference (`runtime.random_u64`, `random_normal`, `epoch_order`) draws the same values.
 *
 * Kotlin has no unsigned 64-bit arithmetic in 1.3 (without experimental types): a Long holds the
 * bits; + and * wrap mod 2^64 exactly as unsigned arithmetic does; shifts use `ushr`; reductions
 * use Long.remainderUnsigned; u64 values leave this object as Longs to be read as unsigned.
 */
object SplitMix64 {
    val GOLDEN: Long = java.lang.Long.parseUnsignedLong("9E3779B97F4A7C15", 16)
    private val M1: Long = java.lang.Long.parseUnsignedLong("BF58476D1CE4E5B9", 16)
    private val M2: Long = java.lang.Long.parseUnsignedLong("94D049BB133111EB", 16)
    private const val TWO_POW_MINUS_53 = 1.0 / 9007199254740992.0  // 2^-53, exact
    private val TWO_PI = 2.0 * Math.PI  // evaluated as (2*pi) first, as the reference does

    const val LATENT = 1L
    const val NOISE = 2L
    const val TIMESTEP = 3L
    const val ORDER = 4L

    fun mix(z0: Long): Long {
        var z = (z0 xor (z0 ushr 30)) * M1
        z = (z xor (z ushr 27)) * M2
        return z xor (z ushr 31)
    }

    /** key(seed, stream, index) = mix(mix(seed + stream*G) + index*G). */
    fun key(seed: Long, stream: Long, index: Long): Long = mix(mix(seed + stream * GOLDEN) + index * GOLDEN)

    /** Value j (0-based) of a stream: mix(key + (j+1)*G). */
    fun u64(key: Long, j: Long): Long = mix(key + (j + 1) * GOLDEN)

    /** ((u >>> 11) + 0.5) * 2^-53: a double in (0, 1). */
    fun uniform(key: Long, j: Long): Double = ((u64(key, j) ushr 11).toDouble() + 0.5) * TWO_POW_MINUS_53

    /**
     * The first n standard normals of a stream (Box-Muller on uniform pairs), rounded to float32.
     * StrictMath (fdlibm) so every JVM and Android version computes the same doubles.
     */
    fun normals(key: Long, n: Int): FloatArray {
        val out = FloatArray(n)
        var p = 0
        while (2 * p < n) {
            val u1 = uniform(key, 2L * p)
            val u2 = uniform(key, 2L * p + 1)
            val r = StrictMath.sqrt(-2.0 * StrictMath.log(u1))
            val angle = TWO_PI * u2
            out[2 * p] = (r * StrictMath.cos(angle)).toFloat()
            if (2 * p + 1 < n) out[2 * p + 1] = (r * StrictMath.sin(angle)).toFloat()
            p++
        }
        return out
    }

    /** u64 mod m for unsigned u64 (m > 0). */
    fun mod(u: Long, m: Long): Long = java.lang.Long.remainderUnsigned(u, m)

    /** Section 3 step 3: t_i = u64(key(seed, TIMESTEP, 0), i) mod T for i = 0..count-1. */
    fun timesteps(seed: Long, count: Int, numTrainTimesteps: Int): IntArray {
        val k = key(seed, TIMESTEP, 0)
        return IntArray(count) { mod(u64(k, it.toLong()), numTrainTimesteps.toLong()).toInt() }
    }

    /** Section 5: the Fisher-Yates order of epoch e over n records. */
    fun epochOrder(seed: Long, epoch: Long, n: Int): IntArray {
        val order = IntArray(n) { it }
        val d = key(seed, ORDER, epoch)
        for (step in 0 until n - 1) {
            val i = n - 1 - step
            val j = mod(u64(d, step.toLong()), (i + 1).toLong()).toInt()
            val t = order[i]
            order[i] = order[j]
            order[j] = t
        }
        return order
    }

    fun unsigned(u: Long): String = java.lang.Long.toUnsignedString(u)
}
