package org.hollowexport.core

import java.io.File

/**
 * PROTOCOL.md section 7: `lora.safetensors` (every manifest.lora parameter under its unet_name,
 * float32, metadata format/format_version/bundle/rank/alpha as strings) and `lora.json` beside it.
 */
object LoraExport {
    const val FILE = "lora.safetensors"
    const val RECORD = "lora.json"
    const val FORMAT = "hollow-export-lora"

    fun metadata(bundle: Bundle): LinkedHashMap<String, String> = linkedMapOf(
            "format" to FORMAT, "format_version" to "1", "bundle" to bundle.id,
            "rank" to bundle.hyper.rankText, "alpha" to bundle.hyper.alphaText)

    /** The LoRA tensors of a checkpoint (a file, or a run folder: its last saved checkpoint). */
    fun tensorsFromCheckpoint(bundle: Bundle, checkpoint: File): Map<String, FloatTensor> {
        val ckpt = OrtCheckpoint.open(checkpoint)
        val out = LinkedHashMap<String, FloatTensor>()
        for (entry in bundle.lora) {
            val t = try {
                ckpt.floatTensor(entry.name)
            } catch (err: IndexOutOfBoundsException) {
                throw RunException("$checkpoint is not a readable checkpoint (damaged)", err)
            } ?: throw RunException("$checkpoint lacks ${entry.name}: it belongs to another bundle")
            if (!t.shape.contentEquals(entry.shape)) {
                throw RunException("$checkpoint: ${entry.name} has shape ${t.shape.toList()}, the bundle says " +
                        "${entry.shape.toList()}: it belongs to another bundle")
            }
            out[entry.unetName] = t
        }
        return out
    }

    fun resolveCheckpoint(path: File): File = if (path.isDirectory) RunFolder(path).lastCheckpoint() else {
        if (!path.isFile) throw RunException("checkpoint $path does not exist")
        path
    }

    /** Read the checkpoint, write both files into `out`; returns the lora.json content. */
    fun export(bundle: Bundle, checkpoint: File, out: File): Map<String, Any?> {
        val file = resolveCheckpoint(checkpoint)
        return write(bundle, tensorsFromCheckpoint(bundle, file), file.name, out)
    }

    /** Write lora.safetensors (atomically) and then lora.json with its sha256. */
    fun write(bundle: Bundle, tensors: Map<String, FloatTensor>, checkpointName: String, out: File): Map<String, Any?> {
        val meta = metadata(bundle)
        val target = File(out, FILE)
        SafetensorsWriter.write(target, tensors, meta)
        val record = LinkedHashMap<String, Any?>(meta)
        record["file"] = FILE
        record["sha256"] = Hashes.sha256(target)
        record["tensors"] = tensors.size
        record["checkpoint"] = checkpointName
        AtomicFiles.writeText(File(out, RECORD), Json.pretty(record) + "\n")
        return record
    }
}
