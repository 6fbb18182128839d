package org.hollowexport.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotEquals
import org.junit.Assert.assertTrue
import org.junit.Test

class SplitMix64Test {
    @Test
    fun firstOutputIsTheReferenceSplitMix64() {
        // Vigna's splitmix64 seeded with 0 first returns 0xE220A8397B1DCDAF: that is u64(key 0, j 0)
        assertEquals("e220a8397b1dcdaf", java.lang.Long.toHexString(SplitMix64.u64(0L, 0)))
    }

    @Test
    fun streamsMatchThePythonReference() {
        // values printed by hollow_export.runtime.stream_key(7, 2, 5) and random_u64(key, 6)
        val key = SplitMix64.key(7, 2, 5)
        assertEquals("6361212709359594989", SplitMix64.unsigned(key))
        val expected = listOf("11569571667161151376", "6914761420500830768", "11178436602470440308",
                "7198993948057188325", "17889375793095254612", "16419244043792700194")
        assertEquals(expected, (0 until 6).map { SplitMix64.unsigned(SplitMix64.u64(key, it.toLong())) })
        val bits = SplitMix64.normals(key, 6).map { java.lang.Float.floatToRawIntBits(it) }
        assertEquals(listOf(-1087459367, 1060045886, -1085951585, 1059258826, 1044613520, -1105095657), bits)
    }

    @Test
    fun uniformIsInsideTheOpenInterval() {
        for (j in 0L until 1000L) {
            val u = SplitMix64.uniform(SplitMix64.key(1, 1, 1), j)
            assertTrue(u > 0.0 && u < 1.0)
        }
    }

    @Test
    fun normalsLookNormalAndOddCountsArePrefixes() {
        val key = SplitMix64.key(3, SplitMix64.NOISE, 9)
        val z = SplitMix64.normals(key, 20001)
        val mean = z.map { it.toDouble() }.sum() / z.size
        val sd = Math.sqrt(z.map { (it - mean) * (it - mean) }.sum() / z.size)
        assertTrue("mean $mean", Math.abs(mean) < 0.03)
        assertTrue("sd $sd", Math.abs(sd - 1) < 0.03)
        assertArrayEquals(SplitMix64.normals(key, 7), z.copyOf(7), 0f)
    }

    @Test
    fun epochOrderIsAPermutationThatChangesPerEpoch() {
        val a = SplitMix64.epochOrder(1, 0, 50)
        assertEquals((0 until 50).toList(), a.sorted())
        assertNotEquals((0 until 50).toList(), a.toList())
        assertArrayEquals(a, SplitMix64.epochOrder(1, 0, 50))
        assertNotEquals(a.toList(), SplitMix64.epochOrder(1, 1, 50).toList())
        assertArrayEquals(intArrayOf(0), SplitMix64.epochOrder(1, 0, 1))
    }

    @Test
    fun unsignedModulusUsesAllSixtyFourBits() {
        // -1L is 2^64 - 1 unsigned: (2^64 - 1) mod 1000 = 615
        assertEquals(615L, SplitMix64.mod(-1L, 1000))
        val t = SplitMix64.timesteps(0, 500, 1000)
        assertTrue(t.all { it in 0..999 })
        assertTrue(t.toSet().size > 300)
    }
}
