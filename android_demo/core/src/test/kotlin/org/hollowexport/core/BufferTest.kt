package org.hollowexport.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.io.RandomAccessFile

class BufferTest {
    private val dir = TestBundles.tempDir("buffer")
    private val bundle = TestBundles.make(File(dir, "bundle"))

    private fun refused(expect: String, body: () -> Unit) {
        try {
            body()
            fail("expected a refusal containing \"$expect\"")
        } catch (err: BufferException) {
            assertTrue("message: ${err.message}", err.message!!.contains(expect))
        }
    }

    @Test
    fun headerIsByteIdenticalToTheReference() {
        // runtime.BufferHeader(bundle='ab'*32, photos='cd'*32, capacity=5, seed=3, dtype='float16',
        //                      latent_shape=[4,2,2], hidden_shape=[3,2]).to_bytes()[12:]
        val h = BufferHeader("ab".repeat(32), "cd".repeat(32), 5, 3, "float16", intArrayOf(4, 2, 2), intArrayOf(3, 2))
        assertEquals("{\"bundle\": \"${"ab".repeat(32)}\", \"capacity\": 5, \"dtype\": \"float16\", " +
                "\"format_version\": 1, \"hidden_shape\": [3, 2], \"latent_shape\": [4, 2, 2], " +
                "\"photos\": \"${"cd".repeat(32)}\", \"record_bytes\": 120, \"seed\": 3}", h.json())
        assertEquals(120, h.recordBytes)
        val bytes = h.toBytes()
        assertEquals("HLWBUF01", String(bytes, 0, 8, Charsets.US_ASCII))
        assertEquals(h.json().length, (bytes[8].toInt() and 0xff) or ((bytes[9].toInt() and 0xff) shl 8))
    }

    @Test
    fun recordsRoundTripWithCrc() {
        for (dtype in listOf("float32", "float16")) {
            val file = File(dir, "rt-$dtype.bin")
            val header = TestBundles.buffer(bundle, file, 6, dtype)
            assertEquals(12L + header.json().length + 6L * header.recordBytes, file.length())
            BufferReader(file, bundle.id).use { r ->
                for (i in 0 until 6) {
                    val want = TestBundles.record(header, i)
                    val got = r.get(i)
                    assertEquals(i, got.index)
                    assertEquals(want.timestep, got.timestep)
                    assertArrayEquals(want.latent, got.latent, 0f)
                    val round: (FloatArray) -> FloatArray = { a -> if (dtype == "float16") FloatArray(a.size) { Half.round(a[it]) } else a }
                    assertArrayEquals(round(want.noise), got.noise, 0f)
                    assertArrayEquals(round(want.hidden), got.hidden, 0f)
                }
            }
        }
    }

    @Test
    fun resumeCutsATornRecordAndContinues() {
        val file = File(dir, "resume.bin")
        val header = TestBundles.header(bundle, 6)
        BufferWriter.open(file, header).use { w -> for (i in 0 until 3) w.append(TestBundles.record(header, i)) }
        file.appendBytes(ByteArray(header.recordBytes / 2) { 9 })  // a kill mid-record
        BufferWriter.open(file, header).use { w ->
            assertEquals(3, w.done)
            for (i in 3 until 6) w.append(TestBundles.record(header, i))
            assertTrue(w.complete)
        }
        val whole = File(dir, "whole.bin")
        TestBundles.buffer(bundle, whole, 6)
        assertArrayEquals(whole.readBytes(), file.readBytes())
        refused("other settings (seed differ)") {
            BufferWriter.open(file, BufferHeader(bundle.id, header.photos, 6, 4, "float32", header.latentShape,
                    header.hiddenShape)).close()
        }
    }

    @Test
    fun readerRefusesWhatIsNotAFinishedBufferOfThisBundle() {
        val file = File(dir, "r.bin")
        val header = TestBundles.buffer(bundle, file, 6)
        val other = File(dir, "junk.bin")
        other.writeBytes("NOTABUFFER-------".toByteArray())
        refused("bad magic") { BufferReader(other, bundle.id) }
        refused("another bundle") { BufferReader(file, "0".repeat(64)) }
        val short = File(dir, "short.bin")
        file.copyTo(short)
        RandomAccessFile(short, "rw").use { it.setLength(it.length() - 10) }
        refused("holds 5 of 6 samples") { BufferReader(short, bundle.id) }
        refused("collect again to finish it") { BufferReader(short, bundle.id) }
        val flipped = File(dir, "flip.bin")
        file.copyTo(flipped)
        RandomAccessFile(flipped, "rw").use { raf ->
            val at = 12L + header.json().length + 2L * header.recordBytes + 20
            raf.seek(at)
            val b = raf.read()
            raf.seek(at)
            raf.write(b xor 0x10)
        }
        refused("sample 2 is corrupted") { BufferReader(flipped, bundle.id) }
        refused("delete the buffer and collect again") { BufferReader(flipped, bundle.id) }
        // a record with a valid crc in the wrong place
        val swapped = File(dir, "swap.bin")
        BufferWriter.open(swapped, header).use { w ->
            w.append(TestBundles.record(header, 0))
        }
        swapped.appendBytes(RecordCodec.encode(header, TestBundles.record(header, 5)))
        for (i in 2 until 6) swapped.appendBytes(RecordCodec.encode(header, TestBundles.record(header, i)))
        refused("sample 1 is out of place") { BufferReader(swapped, bundle.id) }
        val badHeader = File(dir, "hdr.bin")
        badHeader.writeBytes(BufferHeader.MAGIC + byteArrayOf(5, 0, 0, 0) + "{bad!".toByteArray())
        refused("damaged header") { BufferReader(badHeader, bundle.id) }
    }
}
