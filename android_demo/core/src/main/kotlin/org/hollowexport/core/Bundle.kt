package org.hollowexport.core

import com.google.gson.JsonObject
import java.io.File

/** The file names both clients agree on (hollow_export/bundle.py). */
object BundleFiles {
    const val FORMAT = "hollow-export-bundle"
    const val FORMAT_VERSION = 2
    const val MANIFEST = "manifest.json"
    const val VAE_ENCODER = "vae_encoder.onnx"
    const val PRECOMPUTE = "precompute.onnx"
    const val TRAINING_MODEL = "training_model.onnx"
    const val EVAL_MODEL = "eval_model.onnx"
    const val OPTIMIZER_MODEL = "optimizer_model.onnx"
    const val CHECKPOINT = "checkpoint"
    const val FROZEN_WEIGHTS = "frozen_weights.bin"
    const val PROMPTS = "prompts.safetensors"
    const val SCHEDULE = "schedule.safetensors"
}

/** The `hyper` block of a manifest. rank and alpha keep their JSON text (the LoRA metadata copies it). */
class Hyper(
    val lr: Double,
    val seed: Long,
    val batchSize: Int,
    val steps: Int,
    val samples: Int,
    val rankText: String,
    val alphaText: String,
    val predictionType: String,
    val numTrainTimesteps: Int,
    val resolution: Int
)

/** One trainable LoRA tensor: its name in the checkpoint and in the full U-Net. */
class LoraEntry(val name: String, val unetName: String, val shape: IntArray)

class BundleFile(val name: String, val sha256: String, val bytes: Long)

/**
 * The `frozen` block (format 2): the kept base weights, stored once in `file` ("float32" or "float16"),
 * external initializers of the training and eval graphs; `file` null: an ablation build that left them
 * in the checkpoint. Its sha256 is checked with every other file by `Bundle.verify`.
 */
class FrozenWeights(val file: String?, val dtype: String, val sha256: String?, val bytes: Long)

/**
 * The `training_session` block: the ORT session settings of the training session, applied by the app
 * (OrtEngines.kt) as the Python runtime applies them (device/ort_session.py). `configEntries` are
 * session-config entries (`SessionOptions.addConfigEntry`); `evalSession` false: no eval graph is loaded.
 * `memReuse` (`enable_mem_reuse`, absent = true): ORT's planner reuse; the Java API has no setter for it, and
 * with the default graph's unknown batch dimension it changes no allocation (PROTOCOL.md section 5).
 */
class TrainingSessionSettings(val cpuArena: Boolean, val memPattern: Boolean, val configEntries: Map<String, String>,
                              val evalSession: Boolean, val memReuse: Boolean = true)

/**
 * A bundle folder after the checks of PROTOCOL.md section 1: format and version, and (with
 * verify) every listed file present with its size and sha256. `id` is the sha256 of manifest.json.
 */
class Bundle private constructor(val dir: File, val json: JsonObject, val id: String) {
    private val where = File(dir, BundleFiles.MANIFEST).path
    private val plan = Json.obj(json, "plan", where)

    val files: List<BundleFile> = Json.obj(json, "files", where).entrySet().map { (name, value) ->
        val o = value.asJsonObject
        BundleFile(name, Json.str(o, "sha256", "$where files.$name"), Json.long(o, "bytes", "$where files.$name"))
    }

    val hyper: Hyper = Json.obj(json, "hyper", where).let { h ->
        val w = "$where hyper"
        Hyper(
            lr = Json.double(h, "lr", w),
            seed = Json.long(h, "seed", w),
            batchSize = if (h.has("batch_size")) Json.int(h, "batch_size", w) else 1,
            steps = Json.int(h, "steps", w),
            samples = Json.int(h, "samples", w),
            rankText = Json.literal(h, "rank", w),
            alphaText = Json.literal(h, "alpha", w),
            predictionType = Json.str(h, "prediction_type", w),
            numTrainTimesteps = Json.int(h, "num_train_timesteps", w),
            resolution = Json.int(h, "resolution", w)
        )
    }

    /** [4, h, w] */
    val latentShape: IntArray = Json.ints(plan, "latent_shape", "$where plan")
    /** The buffered hidden state of one sample (without the batch axis). */
    val bufferShape: IntArray = Json.ints(plan, "buffer_shape", "$where plan")
    /** [77, D] */
    val encoderShape: IntArray = Json.ints(plan, "encoder_shape", "$where plan")

    val lora: List<LoraEntry> = json.getAsJsonArray("lora").map { e ->
        val o = e.asJsonObject
        LoraEntry(Json.str(o, "name", "$where lora"), Json.str(o, "unet_name", "$where lora"),
                  Json.ints(o, "shape", "$where lora"))
    }

    val frozen: FrozenWeights = Json.obj(json, "frozen", where).let { f ->
        val w = "$where frozen"
        val name = Json.optStr(f, "file")
        val dtype = Json.str(f, "dtype", w)
        if (dtype != "float32" && dtype != "float16") throw BundleException("$w: dtype $dtype is not float32 or float16")
        if (name != null && files.none { it.name == name && it.sha256 == Json.str(f, "sha256", w) }) {
            throw BundleException("$w names $name, which the manifest's files do not list with that sha256")
        }
        FrozenWeights(name, dtype, Json.optStr(f, "sha256"), Json.long(f, "bytes", w))
    }

    val trainingSession: TrainingSessionSettings = Json.obj(json, "training_session", where).let { t ->
        val w = "$where training_session"
        fun flag(key: String): Boolean = t.get(key)?.takeIf { it.isJsonPrimitive && it.asJsonPrimitive.isBoolean }
                ?.asBoolean ?: throw BundleException("$w lacks the boolean $key")
        TrainingSessionSettings(flag("enable_cpu_mem_arena"), flag("enable_mem_pattern"),
                Json.obj(t, "config_entries", w).entrySet().associate { (k, v) -> k to v.asString },
                flag("eval_session"), if (t.has("enable_mem_reuse")) flag("enable_mem_reuse") else true)
    }

    /** The `memory` block (parameter bytes of each part, buffer bytes per sample). */
    val memory: Map<String, Long> = if (json.has("memory")) {
        json.getAsJsonObject("memory").entrySet().associate { (k, v) -> k to v.asLong }
    } else emptyMap()

    fun file(name: String): File = File(dir, name)

    companion object {
        /**
         * Open and check a bundle folder. `onProgress(name, bytesHashed, bytesTotal)` reports the
         * hashing (a phone needs a minute for a multi-GB bundle).
         */
        fun open(dir: File, verify: Boolean = true,
                 onProgress: ((String, Long, Long) -> Unit)? = null): Bundle {
            val manifest = File(dir, BundleFiles.MANIFEST)
            if (!manifest.isFile) {
                throw BundleException("$dir is not a bundle (no ${BundleFiles.MANIFEST}); copy the folder that " +
                        "`hollow-export build` wrote")
            }
            val bytes = manifest.readBytes()
            val json = try {
                Json.parseObject(String(bytes, Charsets.UTF_8), manifest.path)
            } catch (err: HollowException) {
                throw BundleException("${err.message}; rebuild the bundle", err)
            }
            val format = json.get("format")?.let { if (it.isJsonNull) null else it.asString }
            val versionValue = json.get("format_version")
            val version = versionValue?.let { if (it.isJsonNull) null else it.asString }
            val numeric = versionValue != null && versionValue.isJsonPrimitive && versionValue.asJsonPrimitive.isNumber
            if (format != BundleFiles.FORMAT || !numeric || version != BundleFiles.FORMAT_VERSION.toString()) {
                throw BundleException("$dir has format $format v$version; this app reads ${BundleFiles.FORMAT} " +
                        "v${BundleFiles.FORMAT_VERSION} (frozen weights out of the checkpoint): rebuild it with " +
                        "`hollow-export build`")
            }
            val bundle = try {
                Bundle(dir, json, Hashes.sha256(bytes))
            } catch (err: HollowException) {
                throw BundleException("${err.message}; rebuild the bundle", err)
            }
            if (verify) bundle.verify(onProgress)
            return bundle
        }
    }

    /** Every listed file present, of its size, with its sha256; else refuse naming the file. */
    fun verify(onProgress: ((String, Long, Long) -> Unit)? = null) {
        val total = files.map { it.bytes }.sum()
        var done = 0L
        for (entry in files) {
            val f = File(dir, entry.name)
            if (!f.isFile) {
                throw BundleException("bundle file ${entry.name} is missing from $dir; copy the whole bundle again")
            }
            if (f.length() != entry.bytes) {
                throw BundleException("bundle file ${entry.name} has ${f.length()} bytes, the manifest says " +
                        "${entry.bytes} (truncated or modified); copy the bundle again or rebuild it")
            }
            val digest = Hashes.sha256(f) { n ->
                done += n
                if (onProgress != null) onProgress(entry.name, done, total)
            }
            if (digest != entry.sha256) {
                throw BundleException("bundle file ${entry.name} fails its sha256 check (corrupted or modified); " +
                        "copy the bundle again or rebuild it")
            }
        }
    }

    fun prompts(): SafetensorsFile = SafetensorsFile.open(file(BundleFiles.PROMPTS))

    /** prompts.safetensors: instance and class text-encoder states, float32 [1, 77, D]. */
    fun promptStates(name: String): FloatArray {
        val st = prompts()
        val t = st.tensor(name) ?: throw BundleException("${st.file} lacks the prompt \"$name\"; rebuild the bundle")
        return st.readFloats(t)
    }

    /** schedule.safetensors: alphas_cumprod, float32 [T]. */
    fun alphasCumprod(): FloatArray {
        val st = SafetensorsFile.open(file(BundleFiles.SCHEDULE))
        val t = st.tensor("alphas_cumprod")
                ?: throw BundleException("${st.file} lacks alphas_cumprod; rebuild the bundle")
        return st.readFloats(t)
    }
}
