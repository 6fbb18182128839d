package org.hollowexport.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File

class PhotosTest {
    @Test
    fun suffixesFollowPythonPathSuffix() {
        assertEquals(".png", Photos.suffix("a.png"))
        assertEquals(".JPG", Photos.suffix("a.b.JPG"))
        assertEquals("", Photos.suffix(".png"))
        assertEquals("", Photos.suffix("name."))
        assertEquals("", Photos.suffix("noext"))
        assertEquals(listOf("B.JPG", "a.webp", "b.png"), Photos.select(listOf("b.png", "notes.txt", "a.webp", "B.JPG", ".bmp")))
    }

    @Test
    fun digestAndMinimum() {
        val dir = TestBundles.tempDir("photos")
        File(dir, "b.png").writeBytes(byteArrayOf(1, 2))
        File(dir, "a.jpg").writeBytes(byteArrayOf(3))
        try {
            Photos.files(dir)
            fail()
        } catch (err: PhotoException) {
            assertTrue(err.message!!.contains("2 photos"))
        }
        File(dir, "c.bmp").writeBytes(byteArrayOf())
        val files = Photos.files(dir)
        assertEquals(listOf("a.jpg", "b.png", "c.bmp"), files.map { it.name })
        val expected = java.security.MessageDigest.getInstance("SHA-256")
        for (f in files) {
            expected.update(f.name.toByteArray())
            expected.update(0)
            expected.update(java.security.MessageDigest.getInstance("SHA-256").digest(f.readBytes()))
        }
        assertEquals(Hashes.hex(expected.digest()), Photos.digest(files))
    }

    @Test
    fun cropsTheCentreAndScales() {
        // 4 x 2 image: the centre square is columns 1..2
        val px = intArrayOf(0x000000, 0xff0000, 0x00ff00, 0x0000ff, 0x101010, 0x202020, 0x303030, 0x404040)
        val out = Photos.preprocess(px, 4, 2, 2)
        assertEquals(12, out.size)
        assertEquals(1.0f, out[0], 0f)  // R of (1,0) = 255
        assertEquals(-1.0f, out[1], 0f)  // R of (2,0) = 0
        assertEquals(1.0f, out[4 + 1], 0f)  // G of (2,0)
        assertEquals(0x20 / 127.5f - 1.0f, out[2], 0f)
    }

    @Test
    fun bicubicCoefficientsSumToOne() {
        for ((inSize, outSize) in listOf(160 to 128, 90 to 128, 333 to 64, 128 to 129)) {
            val c = PilBicubic.coefficients(inSize, 0f, inSize.toFloat(), outSize)
            for (xx in 0 until outSize) {
                val sum = (0 until c.bounds[2 * xx + 1]).map { c.kk[xx * c.ksize + it] }.sum()
                assertTrue("sum $sum", Math.abs(sum - (1 shl 22)) < c.ksize)
            }
        }
        // a flat image stays flat through resampling
        val flat = Array(3) { ByteArray(50 * 30) { 200.toByte() } }
        val r = PilBicubic.resize(flat, 50, 30, 16, 16)
        assertTrue(r.all { plane -> plane.size == 256 && plane.all { (it.toInt() and 0xff) == 200 } })
    }

    @Test
    fun rssIsReadFromProcStatus() {
        assertEquals(1234L * 1024, MemoryFloor.rssFromProcStatus("Name:\tx\nVmRSS:\t    1234 kB\nVmSwap: 0 kB\n"))
        assertEquals(null, MemoryFloor.rssFromProcStatus("Name: x\n"))
    }
}
