package org.hollowexport.core

import java.io.File
import java.nio.file.Files

/** Small synthetic bundles and folders for the unit tests (the real bundle is tested from pytest). */
object TestBundles {
    fun tempDir(prefix: String): File = Files.createTempDirectory(prefix).toFile()

    /**
     * A bundle folder with the files the core reads: prompts, schedule, a fake checkpoint, and a
     * manifest listing them with sizes and hashes. latent [4,2,2], hidden [3,2], encoder [2,3].
     */
    fun make(dir: File, predictionType: String = "epsilon", batchSize: Int = 1, seed: Long = 0): Bundle {
        dir.mkdirs()
        val acp = FloatArray(10) { 1.0f - 0.09f * it }
        SafetensorsWriter.write(File(dir, BundleFiles.SCHEDULE), mapOf("alphas_cumprod" to FloatTensor(intArrayOf(10), acp)),
                emptyMap())
        SafetensorsWriter.write(File(dir, BundleFiles.PROMPTS), mapOf(
                "instance" to FloatTensor(intArrayOf(1, 2, 3), floatArrayOf(1f, 2f, 3f, 4f, 5f, 6f)),
                "class" to FloatTensor(intArrayOf(1, 2, 3), floatArrayOf(-1f, -2f, -3f, -4f, -5f, -6f))), emptyMap())
        File(dir, BundleFiles.CHECKPOINT).writeBytes(ByteArray(100) { it.toByte() })
        File(dir, BundleFiles.FROZEN_WEIGHTS).writeBytes(ByteArray(64) { (3 * it).toByte() })
        val files = LinkedHashMap<String, Any?>()
        for (name in listOf(BundleFiles.CHECKPOINT, BundleFiles.FROZEN_WEIGHTS, BundleFiles.PROMPTS,
                BundleFiles.SCHEDULE)) {
            val f = File(dir, name)
            files[name] = linkedMapOf("sha256" to Hashes.sha256(f), "bytes" to f.length())
        }
        val manifest = linkedMapOf<String, Any?>(
                "format" to "hollow-export-bundle", "format_version" to 2,
                "model" to linkedMapOf("source" to "test"),
                "plan" to linkedMapOf("latent_shape" to intArrayOf(4, 2, 2), "buffer_shape" to intArrayOf(3, 2),
                        "encoder_shape" to intArrayOf(2, 3), "resolution" to 16),
                "prompts" to linkedMapOf("instance" to "a sks ball", "class" to "a ball"),
                "files" to files,
                "lora" to listOf(linkedMapOf("name" to "a.lora_A.default.weight", "unet_name" to "a.lora_A.weight",
                        "shape" to intArrayOf(2, 3))),
                "hyper" to linkedMapOf("lr" to 0.001, "seed" to seed, "batch_size" to batchSize, "steps" to 20,
                        "samples" to 6, "rank" to 2, "alpha" to Json.Raw("2.0"), "prediction_type" to predictionType,
                        "num_train_timesteps" to 10, "resolution" to 16),
                "frozen" to linkedMapOf("file" to BundleFiles.FROZEN_WEIGHTS, "dtype" to "float16",
                        "sha256" to Hashes.sha256(File(dir, BundleFiles.FROZEN_WEIGHTS)), "bytes" to 64),
                "training_session" to linkedMapOf("enable_cpu_mem_arena" to false, "enable_mem_pattern" to true,
                        "config_entries" to linkedMapOf(
                                "optimization.disable_specified_optimizers" to "ConstantFolding;NchwcTransformer"),
                        "eval_session" to false),
                "memory" to linkedMapOf("precompute_param_bytes" to 400, "hollowed_base_param_bytes" to 1000,
                        "lora_param_bytes" to 24, "optimizer_state_bytes" to 48, "vae_encoder_param_bytes" to 100))
        File(dir, BundleFiles.MANIFEST).writeText(Json.pretty(manifest) + "\n")
        return Bundle.open(dir)
    }

    fun header(bundle: Bundle, capacity: Int = 6, dtype: String = "float32", seed: Long = 3): BufferHeader =
            BufferHeader(bundle.id, "cd".repeat(32), capacity, seed, dtype, bundle.latentShape, bundle.bufferShape)

    fun record(header: BufferHeader, i: Int): Record = Record(i, (i * 7) % 10,
            FloatArray(header.latentCount) { 0.1f * it - i },
            FloatArray(header.latentCount) { 0.01f * it + i },
            FloatArray(header.hiddenCount) { it * 1.5f + i })

    /** A complete buffer of `capacity` synthetic records. */
    fun buffer(bundle: Bundle, file: File, capacity: Int = 6, dtype: String = "float32"): BufferHeader {
        val header = header(bundle, capacity, dtype)
        BufferWriter.open(file, header).use { w -> for (i in 0 until capacity) w.append(record(header, i)) }
        return header
    }
}
