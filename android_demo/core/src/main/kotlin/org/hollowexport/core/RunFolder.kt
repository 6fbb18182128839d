package org.hollowexport.core

import com.google.gson.JsonElement
import com.google.gson.JsonObject
import java.io.File
import java.io.IOException
import java.math.BigDecimal

/**
 * progress.json (PROTOCOL.md section 6). Fields the reference may add are kept as they are.
 */
class Progress(
    val bundle: String,
    val bufferSeed: Long,
    val seed: Long,
    val losses: MutableList<Double>,
    val step: Long,
    val checkpoint: String?,
    val previous: String?,
    val sha256: String?,
    val dataSha256: String?,
    val extra: Map<String, String> = emptyMap()
) {
    fun copy(step: Long = this.step, checkpoint: String? = this.checkpoint, previous: String? = this.previous,
             sha256: String? = this.sha256, dataSha256: String? = this.dataSha256): Progress =
            Progress(bundle, bufferSeed, seed, ArrayList(losses), step, checkpoint, previous, sha256, dataSha256, extra)

    /** The same progress with the extra field `key` set to `json` (JSON text). */
    fun withExtra(key: String, json: String): Progress =
            Progress(bundle, bufferSeed, seed, ArrayList(losses), step, checkpoint, previous, sha256, dataSha256,
                    LinkedHashMap(extra).also { it[key] = json })

    /** The known fields in the reference's key order, then the others (`buffer`, `starts`, ...) as read. */
    fun toJson(): String {
        val map = linkedMapOf<String, Any?>("bundle" to bundle, "buffer_seed" to bufferSeed, "seed" to seed,
                "losses" to losses, "step" to step, "checkpoint" to checkpoint, "previous" to previous,
                "sha256" to sha256, "data_sha256" to dataSha256)
        for ((k, v) in extra) if (!map.containsKey(k)) map[k] = Json.Raw(v)
        return Json.pretty(map) + "\n"
    }

    companion object {
        private val KNOWN = setOf("bundle", "buffer_seed", "seed", "losses", "step", "checkpoint", "previous",
                "sha256", "data_sha256")

        fun parse(json: JsonObject, where: String): Progress {
            val losses = ArrayList<Double>()
            json.getAsJsonArray("losses")?.forEach { losses.add(it.asDouble) }
            val extra = LinkedHashMap<String, String>()
            for ((k, v) in json.entrySet()) if (k !in KNOWN) extra[k] = v.toString()
            return Progress(Json.str(json, "bundle", where), Json.long(json, "buffer_seed", where),
                    Json.long(json, "seed", where), losses, Json.long(json, "step", where),
                    Json.optStr(json, "checkpoint"), Json.optStr(json, "previous"), Json.optStr(json, "sha256"),
                    Json.optStr(json, "data_sha256"), extra)
        }
    }
}

/** Where training (re)starts: the checkpoint to load and the progress so far. */
class StartPoint(val checkpoint: File, val progress: Progress, val fresh: Boolean)

/**
 * A run folder: checkpoint names, progress.json, which files to keep, and the save procedure of
 * section 6, as plain file operations. The ORT call that writes a checkpoint is passed in.
 */
class RunFolder(val dir: File) {
    val progressFile = File(dir, PROGRESS)

    fun readProgress(): Progress? {
        if (!progressFile.isFile) return null
        val json = try {
            Json.parseObject(progressFile.readText(Charsets.UTF_8), progressFile.path)
        } catch (err: HollowException) {
            throw RunException("$progressFile is damaged; delete the run folder to start over", err)
        }
        return try {
            Progress.parse(json, progressFile.path)
        } catch (err: HollowException) {
            throw RunException("$progressFile is damaged (${err.message}); delete the run folder to start over", err)
        }
    }

    /**
     * No progress.json: a fresh run from the bundle's checkpoint over `buffer` (its identity recorded as
     * `buffer`). Otherwise the named checkpoint, after checking that the run belongs to this bundle, was
     * trained on this buffer and that the checkpoint passes its sha256 (and its .data file's), to continue
     * at progress.step. Either way `starts` gains the step this process begins at.
     */
    fun start(bundle: Bundle, buffer: BufferHeader): StartPoint {
        if (!dir.isDirectory && !dir.mkdirs()) throw RunException("cannot create the run folder $dir")
        val progress = readProgress()
        if (progress == null) {
            val fresh = Progress(bundle.id, buffer.seed, bundle.hyper.seed, ArrayList(), 0, null, null, null, null,
                    linkedMapOf("buffer" to Json.compact(bufferIdentity(buffer))))
            return StartPoint(bundle.file(BundleFiles.CHECKPOINT), withStart(fresh), true)
        }
        if (progress.bundle != bundle.id) {
            throw RunException("$dir belongs to another bundle; choose a new run folder")
        }
        checkBuffer(progress, buffer)
        val name = progress.checkpoint
                ?: throw RunException("$progressFile names no checkpoint; delete $dir to start over")
        val path = File(dir, name)
        val data = File(dir, "$name.data")
        val ok = path.isFile && Hashes.sha256(path) == progress.sha256 &&
                (progress.dataSha256 == null || (data.isFile && Hashes.sha256(data) == progress.dataSha256))
        if (!ok) throw RunException("checkpoint $path is missing or fails its hash; delete $dir to start over")
        return StartPoint(path, withStart(progress), false)
    }

    /** Refuse to resume over a buffer other than the one the run started on (its recorded `buffer`, or
     *  only `buffer_seed` in a run folder written before runs recorded their buffer). */
    private fun checkBuffer(progress: Progress, buffer: BufferHeader) {
        val identity = bufferIdentity(buffer)
        val text = progress.extra["buffer"]?.takeIf { it != "null" }  // JSON null: as absent, like the reference
        val differ = if (text == null) {
            if (progress.bufferSeed != buffer.seed) listOf("seed") else emptyList()
        } else {
            val recorded = try {
                Json.parseObject(text, "$progressFile \"buffer\"")
            } catch (err: HollowException) {
                throw RunException("$progressFile is damaged (${err.message}); delete the run folder to start over", err)
            }
            recorded.entrySet().filter { (k, v) -> !sameValue(identity[k], v) }.map { it.key }
        }
        if (differ.isNotEmpty()) {
            throw RunException("$dir was trained on another buffer (${differ.joinToString(", ")} differ); pass the " +
                    "buffer it started with, or a new run folder to train on this one")
        }
    }

    private fun sameValue(mine: Any?, recorded: JsonElement): Boolean {
        if (!recorded.isJsonPrimitive) return false
        val p = recorded.asJsonPrimitive
        return when (mine) {
            is String -> p.isString && p.asString == mine
            is Number -> p.isNumber && BigDecimal(p.asString).compareTo(BigDecimal(mine.toString())) == 0  // 3 == 3.0
            else -> false
        }
    }

    /** `starts` with the step this process begins at appended (an audit trail, PROTOCOL.md section 6). */
    private fun withStart(progress: Progress): Progress {
        val before = progress.extra["starts"]?.let {
            try {
                Json.parse(it, "$progressFile \"starts\"").asJsonArray.map { e -> e.asLong }
            } catch (err: RuntimeException) {
                throw RunException("$progressFile is damaged (\"starts\" is not a list of steps); delete the run " +
                        "folder to start over", err)
            }
        } ?: emptyList()
        return progress.withExtra("starts", Json.compact(before + progress.step))
    }

    /**
     * Save after `step` finished steps: (1) the ORT checkpoint with optimizer state under its final
     * name inside `.saving-<name>`, fsynced, moved in (.data first); (2) progress.json atomically;
     * (3) delete the scratch folder and every checkpoint but the new one and the previous one.
     * If anything fails, the previous checkpoint and progress.json stay valid and RunException says so.
     */
    fun save(step: Long, progress: Progress, writeCheckpoint: (File) -> Unit): Progress {
        val name = checkpointName(step)
        val scratch = File(dir, ".saving-$name")
        val previous = progress.checkpoint
        val saved: Progress
        try {
            scratch.deleteRecursively()
            if (!scratch.mkdirs()) throw IOException("cannot create $scratch")
            writeCheckpoint(File(scratch, name))
            if (!File(scratch, name).isFile) throw IOException("the checkpoint was not written to $scratch")
            for (f in listOf(File(scratch, "$name.data"), File(scratch, name))) {
                if (f.isFile) {
                    AtomicFiles.fsync(f)
                    AtomicFiles.move(f, File(dir, f.name))
                }
            }
            val data = File(dir, "$name.data")
            saved = progress.copy(step = step, checkpoint = name, previous = previous,
                    sha256 = Hashes.sha256(File(dir, name)),
                    dataSha256 = if (data.isFile) Hashes.sha256(data) else null)
            AtomicFiles.writeText(progressFile, saved.toJson())
        } catch (err: IOException) {
            throw saveFailed(err)
        } catch (err: RuntimeException) {
            throw saveFailed(err)
        } finally {
            scratch.deleteRecursively()
        }
        val keep = HashSet<String>()
        for (c in listOf(name, previous)) if (c != null) {
            keep.add(c)
            keep.add("$c.data")
        }
        dir.listFiles()?.forEach { f ->
            if (f.name.startsWith("checkpoint-") && f.name !in keep) f.delete()
        }
        return saved
    }

    private fun saveFailed(err: Throwable) = RunException("cannot save a checkpoint in $dir (${err.message}); " +
            "free storage and start training again: it resumes from the last saved checkpoint", err)

    /** The checkpoint to export: progress.json's, if a checkpoint was saved. */
    fun lastCheckpoint(): File {
        val p = readProgress()
        val name = p?.checkpoint ?: throw RunException("$dir holds no finished checkpoint; train first")
        return File(dir, name)
    }

    companion object {
        const val PROGRESS = "progress.json"

        /** What names a buffer's content, as progress.json's `buffer` records it (the reference's keys). */
        fun bufferIdentity(header: BufferHeader): LinkedHashMap<String, Any?> = linkedMapOf(
                "bundle" to header.bundle, "photos" to header.photos, "seed" to header.seed,
                "capacity" to header.capacity, "dtype" to header.dtype)

        /** checkpoint-SSSSSS: S = finished steps, six digits (more when a run goes past 999999). */
        fun checkpointName(step: Long): String = String.format("checkpoint-%06d", step)

        /** Save every `every` steps, at the last step, and when the time budget is spent or a stop is asked. */
        fun shouldSave(step: Long, totalSteps: Long, every: Int, stopping: Boolean): Boolean =
                (every > 0 && step % every == 0L) || step == totalSteps || stopping
    }
}
