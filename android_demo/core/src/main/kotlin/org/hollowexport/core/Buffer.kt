package org.hollowexport.core

import java.io.Closeable
import java.io.File
import java.io.IOException
import java.io.RandomAccessFile
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import java.nio.file.StandardOpenOption
import java.util.zip.CRC32

/**
 * The buffer header (PROTOCOL.md section 4). Noise and hidden states are stored as `dtype`
 * (float32 or float16); latents are always float32.
 */
class BufferHeader(
    val bundle: String,
    val photos: String,
    val capacity: Int,
    val seed: Long,
    val dtype: String,
    val latentShape: IntArray,
    val hiddenShape: IntArray
) {
    init {
        if (dtype != "float32" && dtype != "float16") {
            throw BufferException("buffer dtype must be float32 or float16 (got $dtype)")
        }
    }

    val latentCount: Int get() = latentShape.fold(1) { a, b -> a * b }
    val hiddenCount: Int get() = hiddenShape.fold(1) { a, b -> a * b }
    val itemSize: Int get() = if (dtype == "float16") 2 else 4

    /** S = 4 + 4 + 4*L + k*L + k*H + 4 */
    val recordBytes: Int get() = 4 + 4 + 4 * latentCount + itemSize * latentCount + itemSize * hiddenCount + 4

    /** The header JSON byte for byte as the reference writes it (json.dumps, sort_keys=True). */
    fun json(): String = Json.compact(linkedMapOf<String, Any?>(
            "format_version" to VERSION, "bundle" to bundle, "photos" to photos, "capacity" to capacity,
            "seed" to seed, "dtype" to dtype, "latent_shape" to latentShape, "hidden_shape" to hiddenShape,
            "record_bytes" to recordBytes), sortKeys = true)

    /** magic, u32 length, JSON. */
    fun toBytes(): ByteArray {
        val body = json().toByteArray(Charsets.UTF_8)
        val out = ByteBuffer.allocate(MAGIC.size + 4 + body.size).order(ByteOrder.LITTLE_ENDIAN)
        out.put(MAGIC).putInt(body.size).put(body)
        return out.array()
    }

    /** Field names whose values differ from `other` (empty when the headers agree). */
    fun differences(other: BufferHeader): List<String> {
        val out = ArrayList<String>()
        if (bundle != other.bundle) out.add("bundle")
        if (photos != other.photos) out.add("photos")
        if (capacity != other.capacity) out.add("capacity")
        if (seed != other.seed) out.add("seed")
        if (dtype != other.dtype) out.add("dtype")
        if (!latentShape.contentEquals(other.latentShape)) out.add("latent_shape")
        if (!hiddenShape.contentEquals(other.hiddenShape)) out.add("hidden_shape")
        return out
    }

    override fun equals(other: Any?): Boolean = other is BufferHeader && differences(other).isEmpty()

    override fun hashCode(): Int = bundle.hashCode() * 31 + photos.hashCode()

    companion object {
        val MAGIC: ByteArray = "HLWBUF01".toByteArray(Charsets.US_ASCII)
        const val VERSION = 1

        /** (header, byte offset of record 0); refuses files that are not buffers. */
        fun read(file: File): Pair<BufferHeader, Long> {
            if (!file.isFile) {
                throw BufferException("buffer $file does not exist; collect first")
            }
            RandomAccessFile(file, "r").use { raf ->
                val head = ByteArray(MAGIC.size + 4)
                if (raf.length() < head.size) throw notBuffer(file)
                raf.readFully(head)
                if (!head.copyOfRange(0, MAGIC.size).contentEquals(MAGIC)) throw notBuffer(file)
                val size = ByteBuffer.wrap(head, MAGIC.size, 4).order(ByteOrder.LITTLE_ENDIAN).int.toLong() and 0xffffffffL
                if (size > raf.length() - head.size) throw damaged(file, null)
                val body = ByteArray(size.toInt())
                raf.readFully(body)
                val json = try {
                    Json.parseObject(String(body, Charsets.UTF_8), "$file header")
                } catch (err: HollowException) {
                    throw damaged(file, err)
                }
                val version = json.get("format_version")?.let { if (it.isJsonNull) null else it.asString }
                if (version != VERSION.toString()) {
                    throw BufferException("$file is buffer format v$version, this app reads v$VERSION; collect again")
                }
                val header = try {
                    val w = "$file header"
                    BufferHeader(Json.str(json, "bundle", w), Json.str(json, "photos", w),
                            Json.int(json, "capacity", w), Json.long(json, "seed", w), Json.str(json, "dtype", w),
                            Json.ints(json, "latent_shape", w), Json.ints(json, "hidden_shape", w))
                } catch (err: HollowException) {
                    throw damaged(file, err)
                }
                if (json.has("record_bytes") && Json.long(json, "record_bytes", "$file header") != header.recordBytes.toLong()) {
                    throw damaged(file, null)
                }
                return Pair(header, MAGIC.size + 4 + size)
            }
        }

        private fun notBuffer(file: File) = BufferException(
                "$file is not a hollow-export buffer (bad magic); pass the file that collection wrote")

        private fun damaged(file: File, cause: Throwable?) = BufferException(
                "$file has a damaged header; delete it and collect again", cause)
    }
}

/** One sample: noise and hidden are float32 here whatever the buffer stores. */
class Record(val index: Int, val timestep: Int, val latent: FloatArray, val noise: FloatArray, val hidden: FloatArray)

/** u32 index | i32 timestep | f32 latent | dtype noise | dtype hidden | u32 crc32 (little-endian). */
object RecordCodec {
    fun encode(header: BufferHeader, record: Record): ByteArray {
        require(record.latent.size == header.latentCount && record.noise.size == header.latentCount &&
                record.hidden.size == header.hiddenCount) { "record ${record.index} has the wrong shapes" }
        val buf = ByteBuffer.allocate(header.recordBytes).order(ByteOrder.LITTLE_ENDIAN)
        buf.putInt(record.index).putInt(record.timestep)
        for (v in record.latent) buf.putFloat(v)
        putValues(buf, header, record.noise)
        putValues(buf, header, record.hidden)
        val crc = CRC32()
        crc.update(buf.array(), 0, buf.position())
        buf.putInt(crc.value.toInt())
        return buf.array()
    }

    private fun putValues(buf: ByteBuffer, header: BufferHeader, values: FloatArray) {
        if (header.dtype == "float16") {
            for (v in values) buf.putShort(Half.fromFloat(v).toShort())
        } else {
            for (v in values) buf.putFloat(v)
        }
    }

    private fun getValues(buf: ByteBuffer, header: BufferHeader, n: Int): FloatArray {
        val out = FloatArray(n)
        if (header.dtype == "float16") {
            for (i in 0 until n) out[i] = Half.toFloat(buf.short.toInt() and 0xffff)
        } else {
            for (i in 0 until n) out[i] = buf.float
        }
        return out
    }

    /** Decode and check the crc32; `where` names the record in the refusal. */
    fun decode(header: BufferHeader, raw: ByteArray, where: String): Record {
        val crc = CRC32()
        crc.update(raw, 0, raw.size - 4)
        val buf = ByteBuffer.wrap(raw).order(ByteOrder.LITTLE_ENDIAN)
        val stored = buf.getInt(raw.size - 4).toLong() and 0xffffffffL
        if (crc.value != stored) {
            throw BufferException("$where is corrupted (checksum mismatch); delete the buffer and collect again")
        }
        val index = buf.int
        val timestep = buf.int
        val latent = FloatArray(header.latentCount)
        for (i in latent.indices) latent[i] = buf.float
        val noise = getValues(buf, header, header.latentCount)
        val hidden = getValues(buf, header, header.hiddenCount)
        return Record(index, timestep, latent, noise, hidden)
    }
}

/**
 * Appends records durably (section 3 step 6, section 4 "Resuming a collection"): creates the
 * file with its header, or checks an existing file has the same header, cuts a torn last record
 * off, and continues at the next index. Each append is fsynced before it returns.
 */
class BufferWriter private constructor(val file: File, val header: BufferHeader, private val start: Long,
                                       done: Int) : Closeable {
    var done: Int = done
        private set
    private val channel: FileChannel = FileChannel.open(file.toPath(), StandardOpenOption.WRITE)

    init {
        channel.position(start + done.toLong() * header.recordBytes)
    }

    val complete: Boolean get() = done >= header.capacity

    fun append(record: Record) {
        if (record.index != done) throw IllegalStateException("record ${record.index} appended at position $done")
        if (done >= header.capacity) throw IllegalStateException("buffer $file is full")
        try {
            val bytes = ByteBuffer.wrap(RecordCodec.encode(header, record))
            while (bytes.hasRemaining()) channel.write(bytes)
            channel.force(true)
        } catch (err: IOException) {
            throw BufferException("cannot write $file (${err.message}); free storage and collect again: " +
                    "finished samples are kept", err)
        }
        done++
    }

    override fun close() = channel.close()

    companion object {
        fun open(file: File, header: BufferHeader): BufferWriter {
            if (!file.exists() || file.length() == 0L) {
                AtomicFiles.writeBytes(file, header.toBytes())
                return BufferWriter(file, header, header.toBytes().size.toLong(), 0)
            }
            val (old, start) = BufferHeader.read(file)
            val differ = old.differences(header)
            if (differ.isNotEmpty()) {
                throw BufferException("$file was collected with other settings (${differ.joinToString(", ")} " +
                        "differ); delete it or choose another buffer file")
            }
            val size = file.length()
            val done = Math.min((size - start) / header.recordBytes, header.capacity.toLong()).toInt()
            val end = start + done.toLong() * header.recordBytes
            if (end != size) {  // a record torn by a kill (or extra bytes): cut back to the last whole record
                FileChannel.open(file.toPath(), StandardOpenOption.WRITE).use {
                    it.truncate(end)
                    it.force(true)
                }
            }
            return BufferWriter(file, header, start, done)
        }
    }
}

/**
 * Random access to complete, checksummed records (section 4 "Before training"): refuses a file
 * that is not a buffer, of another bundle, unfinished, or with any bad record; all records are
 * checked once, streaming, when it opens.
 */
class BufferReader(val file: File, bundleId: String, checkAll: Boolean = true) : Closeable {
    val header: BufferHeader
    private val start: Long
    private val raf: RandomAccessFile

    init {
        val (h, s) = BufferHeader.read(file)
        header = h
        start = s
        if (header.bundle != bundleId) {
            throw BufferException("$file was collected for another bundle; collect again with this bundle")
        }
        val complete = (file.length() - start) / header.recordBytes
        if (complete < header.capacity) {
            throw BufferException("$file holds $complete of ${header.capacity} samples (truncated or " +
                    "unfinished); collect again to finish it")
        }
        raf = RandomAccessFile(file, "r")
        if (checkAll) {
            try {
                for (i in 0 until header.capacity) get(i)
            } catch (err: Throwable) {
                raf.close()
                throw err
            }
        }
    }

    val size: Int get() = header.capacity

    fun get(i: Int): Record {
        if (i < 0 || i >= header.capacity) throw IndexOutOfBoundsException("record $i of ${header.capacity}")
        val raw = ByteArray(header.recordBytes)
        raf.seek(start + i.toLong() * header.recordBytes)
        raf.readFully(raw)
        val record = RecordCodec.decode(header, raw, "$file sample $i")
        if (record.index != i) {
            throw BufferException("$file sample $i is out of place; delete the buffer and collect again")
        }
        return record
    }

    override fun close() = raf.close()
}
