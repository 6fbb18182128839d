package org.hollowexport.core

import java.io.File
import java.io.RandomAccessFile
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel

/**
 * Reads trained parameters out of an ONNX Runtime on-device training checkpoint, for the LoRA
 * export (PROTOCOL.md section 7). The ORT Java API (1.19) has no call that returns a parameter's
 * values (OrtTrainingSession has trainStep/saveCheckpoint/... but no getParameter), so the app reads
 * the checkpoint file itself. It is a FlatBuffer with file identifier "ODTC", schema
 * onnxruntime/core/flatbuffers/schema/ort_training_checkpoint.fbs:
 *
 *   table Checkpoint  { version:int; module_state:ModuleState; optimizer_groups:[...]; property_bag:... }
 *   table ModuleState { requires_grad_params:[Tensor]; frozen_params:[Tensor]; is_nominal_state:bool;
 *                       has_external_data:bool }
 *   table Tensor      { name:string; doc_string:string; dims:[int64]; data_type:TensorDataType(int);
 *                       raw_data:[ubyte]; string_data:[string]; external_data_offset:int64 = -1 }
 *
 * Tensors over ORT's size limit keep their bytes in `<checkpoint>.data` at external_data_offset.
 */
class OrtCheckpoint private constructor(val file: File, private val buf: ByteBuffer) {
    class Param(val name: String, val dims: LongArray, val dataType: Int, val rawPos: Int, val rawLen: Int,
                val externalOffset: Long)

    val version: Int
    /** Trainable parameters by name. */
    val trainable: Map<String, Param>
    val frozenCount: Int

    init {
        if (buf.capacity() < 8 || !ident().contentEquals(IDENTIFIER)) {
            throw RunException("$file is not an ONNX Runtime training checkpoint (no ODTC identifier)")
        }
        val root = offsetTarget(0)
        version = scalarInt(root, 0, 0)
        val module = field(root, 1)
        val params = LinkedHashMap<String, Param>()
        var frozen = 0
        if (module != 0) {
            val ms = offsetTarget(module)
            val req = field(ms, 0)
            if (req != 0) forEachTable(offsetTarget(req)) { t ->
                val p = tensor(t)
                params[p.name] = p
            }
            val fz = field(ms, 1)
            if (fz != 0) frozen = buf.getInt(offsetTarget(fz))
        }
        trainable = params
        frozenCount = frozen
    }

    private fun ident(): ByteArray {
        val b = ByteArray(4)
        for (i in 0 until 4) b[i] = buf.get(4 + i)
        return b
    }

    /** Absolute position of field `index` of the table at `table`, or 0 when absent. */
    private fun field(table: Int, index: Int): Int {
        val vtable = table - buf.getInt(table)
        val vtSize = buf.getShort(vtable).toInt() and 0xffff
        val slot = 4 + 2 * index
        if (slot >= vtSize) return 0
        val rel = buf.getShort(vtable + slot).toInt() and 0xffff
        return if (rel == 0) 0 else table + rel
    }

    /** Follow a uoffset stored at `pos`. */
    private fun offsetTarget(pos: Int): Int = pos + buf.getInt(pos)

    private fun scalarInt(table: Int, index: Int, default: Int): Int {
        val p = field(table, index)
        return if (p == 0) default else buf.getInt(p)
    }

    private fun scalarLong(table: Int, index: Int, default: Long): Long {
        val p = field(table, index)
        return if (p == 0) default else buf.getLong(p)
    }

    private fun forEachTable(vector: Int, body: (Int) -> Unit) {
        val n = buf.getInt(vector)
        for (i in 0 until n) {
            val elem = vector + 4 + 4 * i
            body(offsetTarget(elem))
        }
    }

    private fun string(pos: Int): String {
        val at = offsetTarget(pos)
        val n = buf.getInt(at)
        val bytes = ByteArray(n)
        for (i in 0 until n) bytes[i] = buf.get(at + 4 + i)
        return String(bytes, Charsets.UTF_8)
    }

    private fun tensor(t: Int): Param {
        val namePos = field(t, 0)
        if (namePos == 0) throw RunException("$file has a tensor without a name (damaged checkpoint)")
        val dimsPos = field(t, 2)
        val dims = if (dimsPos == 0) LongArray(0) else {
            val v = offsetTarget(dimsPos)
            LongArray(buf.getInt(v)) { buf.getLong(v + 4 + 8 * it) }
        }
        val rawPos = field(t, 4)
        var start = 0
        var len = 0
        if (rawPos != 0) {
            val v = offsetTarget(rawPos)
            len = buf.getInt(v)
            start = v + 4
        }
        return Param(string(namePos), dims, scalarInt(t, 3, 0), start, len, scalarLong(t, 6, -1L))
    }

    /** A trainable float32 parameter's values, or null if the checkpoint has no such parameter. */
    fun floatTensor(name: String): FloatTensor? {
        val p = trainable[name] ?: return null
        if (p.dataType != FLOAT) throw RunException("$file: parameter $name is not float32 (type ${p.dataType})")
        val count = p.dims.fold(1L) { a, b -> a * b }
        val bytes = Math.toIntExact(count * 4)
        val data = FloatArray(count.toInt())
        if (p.rawLen > 0 || p.externalOffset < 0) {
            if (p.rawLen != bytes) throw RunException("$file: parameter $name holds ${p.rawLen} bytes, expected $bytes")
            val slice = buf.duplicate().order(ByteOrder.LITTLE_ENDIAN)
            slice.position(p.rawPos)
            slice.limit(p.rawPos + p.rawLen)
            slice.slice().order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(data)
        } else {
            val external = File(file.path + ".data")
            if (!external.isFile) throw RunException("$external is missing: a large checkpoint keeps its weights there")
            RandomAccessFile(external, "r").use { raf ->
                if (p.externalOffset + bytes > raf.length()) {
                    throw RunException("$external is shorter than parameter $name needs (truncated?)")
                }
                val raw = ByteArray(bytes)
                raf.seek(p.externalOffset)
                raf.readFully(raw)
                ByteBuffer.wrap(raw).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(data)
            }
        }
        return FloatTensor(p.dims.map { Math.toIntExact(it) }.toIntArray(), data)
    }

    companion object {
        val IDENTIFIER = "ODTC".toByteArray(Charsets.US_ASCII)
        const val FLOAT = 1

        fun open(file: File): OrtCheckpoint {
            if (!file.isFile) throw RunException("checkpoint $file does not exist")
            RandomAccessFile(file, "r").use { raf ->
                val channel = raf.channel
                if (channel.size() > Int.MAX_VALUE) throw RunException("$file is too large to be a checkpoint")
                val map = channel.map(FileChannel.MapMode.READ_ONLY, 0, channel.size())
                map.order(ByteOrder.LITTLE_ENDIAN)
                return try {
                    OrtCheckpoint(file, map)
                } catch (err: IndexOutOfBoundsException) {
                    throw RunException("$file is not a readable checkpoint (damaged)", err)
                }
            }
        }
    }
}
