package org.hollowexport.core

import com.google.gson.JsonObject
import java.io.File
import java.io.RandomAccessFile
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** One tensor entry of a safetensors header. `begin`/`end` count from the end of the header. */
class TensorInfo(val name: String, val dtype: String, val shape: IntArray, val begin: Long, val end: Long) {
    val count: Long get() = shape.fold(1L) { a, b -> a * b }
}

/**
 * Minimal safetensors reader (PROTOCOL.md section 1): u64 header length N, N bytes of JSON,
 * then raw little-endian data. Reads float32 tensors (prompts, schedule, returned LoRA files).
 */
class SafetensorsFile private constructor(
    val file: File,
    val dataStart: Long,
    val tensors: Map<String, TensorInfo>,
    val metadata: Map<String, String>
) {
    fun tensor(name: String): TensorInfo? = tensors[name]

    fun readFloats(t: TensorInfo): FloatArray {
        if (t.dtype != "F32") throw HollowException("$file: tensor ${t.name} is ${t.dtype}, expected F32")
        val n = t.count
        if (t.end - t.begin != n * 4) throw HollowException("$file: tensor ${t.name} has inconsistent offsets")
        val out = FloatArray(Math.toIntExact(n))
        RandomAccessFile(file, "r").use { raf ->
            val bytes = ByteArray(Math.toIntExact(n * 4))
            raf.seek(dataStart + t.begin)
            raf.readFully(bytes)
            ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(out)
        }
        return out
    }

    companion object {
        fun open(file: File): SafetensorsFile {
            if (!file.isFile) throw HollowException("$file does not exist")
            RandomAccessFile(file, "r").use { raf ->
                val size = raf.length()
                if (size < 8) throw HollowException("$file is not a safetensors file (too short)")
                val head = ByteArray(8)
                raf.readFully(head)
                val n = ByteBuffer.wrap(head).order(ByteOrder.LITTLE_ENDIAN).long
                if (n <= 0 || n > size - 8 || n > 100_000_000) {
                    throw HollowException("$file is not a safetensors file (header length $n)")
                }
                val text = ByteArray(n.toInt())
                raf.readFully(text)
                val json: JsonObject = Json.parseObject(String(text, Charsets.UTF_8), "$file header")
                val tensors = LinkedHashMap<String, TensorInfo>()
                val metadata = LinkedHashMap<String, String>()
                val dataSize = size - 8 - n
                for ((name, value) in json.entrySet()) {
                    val o = value.asJsonObject
                    if (name == "__metadata__") {
                        for ((k, v) in o.entrySet()) metadata[k] = v.asString
                        continue
                    }
                    val offsets = Json.ints(o, "data_offsets", "$file $name").map { it.toLong() }
                    if (offsets.size != 2 || offsets[0] < 0 || offsets[1] < offsets[0] || offsets[1] > dataSize) {
                        throw HollowException("$file: tensor $name has offsets outside the file (truncated?)")
                    }
                    tensors[name] = TensorInfo(name, Json.str(o, "dtype", "$file $name"),
                            Json.ints(o, "shape", "$file $name"), offsets[0], offsets[1])
                }
                return SafetensorsFile(file, 8 + n, tensors, metadata)
            }
        }
    }
}

/** A float32 tensor to write. */
class FloatTensor(val shape: IntArray, val data: FloatArray) {
    init {
        val n = shape.fold(1L) { a, b -> a * b }
        require(n == data.size.toLong()) { "shape ${shape.toList()} does not hold ${data.size} values" }
    }
}

/**
 * safetensors writer: `__metadata__` first (keys sorted), tensors sorted by name, header padded
 * with spaces to a multiple of 8 bytes (as the reference library does), then the raw data.
 * Written through [AtomicFiles] so a kill never leaves half a file under the final name.
 */
object SafetensorsWriter {
    fun encodeHeader(tensors: Map<String, FloatTensor>, metadata: Map<String, String>): ByteArray {
        val header = LinkedHashMap<String, Any?>()
        if (metadata.isNotEmpty()) {
            val meta = LinkedHashMap<String, Any?>()
            for (k in metadata.keys.sortedWith(CodePointOrder)) meta[k] = metadata[k]
            header["__metadata__"] = meta
        }
        var offset = 0L
        for (name in tensors.keys.sortedWith(CodePointOrder)) {
            val t = tensors.getValue(name)
            val bytes = t.data.size.toLong() * 4
            header[name] = linkedMapOf<String, Any?>("dtype" to "F32", "shape" to t.shape,
                    "data_offsets" to listOf(offset, offset + bytes))
            offset += bytes
        }
        var text = Json.tight(header).toByteArray(Charsets.UTF_8)
        val padded = (text.size + 7) / 8 * 8
        if (padded != text.size) text = text + ByteArray(padded - text.size) { 0x20.toByte() }
        return text
    }

    fun write(file: File, tensors: Map<String, FloatTensor>, metadata: Map<String, String>) {
        val header = encodeHeader(tensors, metadata)
        AtomicFiles.write(file) { out ->
            val len = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(header.size.toLong())
            out.write(len.array())
            out.write(header)
            for (name in tensors.keys.sortedWith(CodePointOrder)) {
                val data = tensors.getValue(name).data
                val buf = ByteBuffer.allocate(data.size * 4).order(ByteOrder.LITTLE_ENDIAN)
                buf.asFloatBuffer().put(data)
                out.write(buf.array())
            }
        }
    }
}
