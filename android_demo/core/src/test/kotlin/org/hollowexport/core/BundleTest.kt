package org.hollowexport.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.io.RandomAccessFile

class BundleTest {
    private fun refused(expect: String, body: () -> Unit) {
        try {
            body()
            fail("expected a refusal containing \"$expect\"")
        } catch (err: BundleException) {
            assertTrue("message: ${err.message}", err.message!!.contains(expect))
        }
    }

    @Test
    fun opensAndReadsTheManifest() {
        val dir = TestBundles.tempDir("bundle")
        val b = TestBundles.make(dir)
        assertEquals(Hashes.sha256(File(dir, "manifest.json")), b.id)
        assertEquals(listOf(4, 2, 2), b.latentShape.toList())
        assertEquals("2", b.hyper.rankText)
        assertEquals("2.0", b.hyper.alphaText)
        assertEquals(0.001, b.hyper.lr, 0.0)
        assertEquals(10, b.alphasCumprod().size)
        assertEquals(listOf(1f, 2f, 3f, 4f, 5f, 6f), b.promptStates("instance").toList())
        assertEquals("a.lora_A.weight", b.lora[0].unetName)
        assertEquals(1000L + 24 + 24 + 48, MemoryFloor(b.memory).training)
        assertEquals(400L, MemoryFloor(b.memory).collection)
        assertEquals("frozen_weights.bin", b.frozen.file)
        assertEquals("float16", b.frozen.dtype)
        assertEquals(Hashes.sha256(File(dir, "frozen_weights.bin")), b.frozen.sha256)
        assertEquals(false, b.trainingSession.cpuArena)
        assertEquals(true, b.trainingSession.memPattern)
        assertEquals(false, b.trainingSession.evalSession)
        assertEquals(mapOf("optimization.disable_specified_optimizers" to "ConstantFolding;NchwcTransformer"),
                b.trainingSession.configEntries)
    }

    @Test
    fun refusesFlippedMissingResizedFilesNamingThem() {
        val dir = TestBundles.tempDir("bundle")
        TestBundles.make(dir)
        RandomAccessFile(File(dir, "prompts.safetensors"), "rw").use { raf ->
            raf.seek(40)
            val b = raf.read()
            raf.seek(40)
            raf.write(b xor 1)
        }
        refused("prompts.safetensors fails its sha256") { Bundle.open(dir) }
        Bundle.open(dir, verify = false)  // the manifest itself is fine
        File(dir, "schedule.safetensors").appendBytes(byteArrayOf(0))
        refused("bundle file prompts.safetensors") { Bundle.open(dir) }  // first listed problem, in manifest order
        File(dir, "checkpoint").delete()
        refused("bundle file checkpoint is missing") { Bundle.open(dir) }
    }

    @Test
    fun refusesATamperedFrozenWeightsFile() {
        val dir = TestBundles.tempDir("bundle")
        TestBundles.make(dir)
        RandomAccessFile(File(dir, "frozen_weights.bin"), "rw").use { raf ->
            raf.seek(10)
            raf.write(raf.read() xor 0x40)
        }
        refused("frozen_weights.bin fails its sha256") { Bundle.open(dir) }
        val manifest = File(dir, "manifest.json")
        manifest.writeText(manifest.readText().replace("\"file\": \"frozen_weights.bin\"", "\"file\": \"other.bin\""))
        refused("frozen names other.bin") { Bundle.open(dir, verify = false) }
    }

    @Test
    fun refusesOtherFormatsAndVersions() {
        val dir = TestBundles.tempDir("bundle")
        TestBundles.make(dir)
        val manifest = File(dir, "manifest.json")
        val text = manifest.readText()
        manifest.writeText(text.replace("\"format_version\": 2", "\"format_version\": 1"))
        refused("v1; this app reads hollow-export-bundle v2") { Bundle.open(dir) }  // a format-1 bundle
        refused("rebuild it with `hollow-export build`") { Bundle.open(dir) }
        manifest.writeText(text.replace("\"format_version\": 2", "\"format_version\": \"2\""))
        refused("this app reads hollow-export-bundle v2") { Bundle.open(dir) }
        manifest.writeText(text.replace("hollow-export-bundle", "something-else"))
        refused("something-else") { Bundle.open(dir) }
        manifest.writeText("{not json")
        refused("not valid JSON") { Bundle.open(dir) }
        refused("no manifest.json") { Bundle.open(File(dir, "nowhere")) }
    }
}
