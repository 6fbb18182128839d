package org.hollowexport.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Test
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

class SafetensorsTest {
    @Test
    fun writesSortedPaddedHeaderAndReadsItBack() {
        val f = File(TestBundles.tempDir("st"), "x.safetensors")
        val a = FloatTensor(intArrayOf(2, 3), FloatArray(6) { it * 0.5f })
        val b = FloatTensor(intArrayOf(4), floatArrayOf(-1f, 0f, 1f, 1e-30f))
        SafetensorsWriter.write(f, linkedMapOf("z.b" to b, "a.a" to a), mapOf("rank" to "4", "format" to "x"))
        val bytes = f.readBytes()
        val n = ByteBuffer.wrap(bytes, 0, 8).order(ByteOrder.LITTLE_ENDIAN).long.toInt()
        assertEquals(0, n % 8)
        val header = String(bytes, 8, n, Charsets.UTF_8)
        assertEquals("{\"__metadata__\":{\"format\":\"x\",\"rank\":\"4\"},\"a.a\":{\"dtype\":\"F32\",\"shape\":[2,3]," +
                "\"data_offsets\":[0,24]},\"z.b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}",
                header.trimEnd())
        assertEquals(8 + n + 40, bytes.size)
        val st = SafetensorsFile.open(f)
        assertEquals(mapOf("format" to "x", "rank" to "4"), st.metadata)
        assertArrayEquals(a.data, st.readFloats(st.tensor("a.a")!!), 0f)
        assertArrayEquals(b.data, st.readFloats(st.tensor("z.b")!!), 0f)
        assertEquals(listOf(2, 3), st.tensor("a.a")!!.shape.toList())
    }

    @Test
    fun loraExportWritesRecordWithHash() {
        val dir = TestBundles.tempDir("lora")
        val bundle = TestBundles.make(File(dir, "bundle"))
        val out = File(dir, "out")
        val t = FloatTensor(intArrayOf(2, 3), FloatArray(6) { it.toFloat() })
        val record = LoraExport.write(bundle, mapOf("a.lora_A.weight" to t), "checkpoint-000020", out)
        val file = File(out, "lora.safetensors")
        assertEquals(Hashes.sha256(file), record["sha256"])
        val st = SafetensorsFile.open(file)
        assertEquals(mapOf("format" to "hollow-export-lora", "format_version" to "1", "bundle" to bundle.id,
                "rank" to "2", "alpha" to "2.0"), st.metadata)
        val json = Json.parseObject(File(out, "lora.json").readText(), "lora.json")
        assertEquals("lora.safetensors", json.get("file").asString)
        assertEquals(1, json.get("tensors").asInt)
        assertEquals("checkpoint-000020", json.get("checkpoint").asString)
        assertEquals("1", json.get("format_version").asString)
    }
}
