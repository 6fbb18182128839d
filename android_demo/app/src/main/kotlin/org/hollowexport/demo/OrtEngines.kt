package org.hollowexport.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.OrtTrainingSession
import org.hollowexport.core.Bundle
import org.hollowexport.core.BundleFiles
import org.hollowexport.core.HiddenPrecompute
import org.hollowexport.core.LatentEncoder
import org.hollowexport.core.TrainingBatch
import org.hollowexport.core.TrainingEngine
import org.hollowexport.core.TrainingSessionSettings
import java.io.File
import java.nio.FloatBuffer
import java.nio.LongBuffer

/*
 * The only code that talks to ONNX Runtime (com.microsoft.onnxruntime:onnxruntime-training-android
 * 1.19.2). API names and signatures as in microsoft/onnxruntime, java/src/main/java/ai/onnxruntime/:
 *   OrtEnvironment.java      getEnvironment(); createSession(String modelPath, OrtSession.SessionOptions);
 *                            createTrainingSession(String checkpointPath, String trainPath, String evalPath,
 *                                                  String optimizerPath, OrtSession.SessionOptions)
 *                            ("evalPath ... Null signifies there is no eval model")
 *   OrtSession.java          run(Map<String, ? extends OnnxTensorLike>) -> OrtSession.Result;
 *                            Result.get(String) -> Optional<OnnxValue>;
 *                            SessionOptions.setIntraOpNumThreads(int), setCPUArenaAllocator(boolean),
 *                            setMemoryPatternOptimization(boolean), addConfigEntry(String key, String value)
 *   OnnxTensor.java          createTensor(OrtEnvironment, FloatBuffer, long[]); createTensor(OrtEnvironment,
 *                            LongBuffer, long[]); getFloatBuffer()
 *   OrtTrainingSession.java  trainStep(Map<String, ? extends OnnxTensorLike>, Set<String> requestedOutputs);
 *                            optimizerStep(); lazyResetGrad(); setLearningRate(float);
 *                            saveCheckpoint(java.nio.file.Path, boolean saveOptimizer); close()
 *   (OrtTrainingSession.OrtCheckpointState.loadCheckpoint(String) is package-private in 1.19: the checkpoint is
 *    loaded, with its optimizer state, by OrtEnvironment.createTrainingSession from the path given to it.)
 * All protocol logic (what to feed, in which order, when to save) lives in :core.
 */

private fun options(threads: Int): OrtSession.SessionOptions = OrtSession.SessionOptions().apply {
    // OrtSession.java, SessionOptions.setIntraOpNumThreads(int)
    setIntraOpNumThreads(threads)
}

/**
 * The training session's options: the bundle's `training_session` settings (PROTOCOL.md section 5),
 * the same the Python runtime applies (hollow_export/device/ort_session.py): the CPU arena as named (on
 * for the default graph, whose unknown batch dimension makes ORT free each activation at its last use), memory
 * pattern as named, and the config entries (graph transformers ConstantFolding and NchwcTransformer
 * off, so ORT neither copies nor re-lays the frozen weights and fp16 weights stay fp16 in memory).
 */
private fun trainingOptions(settings: TrainingSessionSettings, threads: Int): OrtSession.SessionOptions =
        options(threads).apply {
            setCPUArenaAllocator(settings.cpuArena)  // OrtSession.java, SessionOptions.setCPUArenaAllocator(boolean)
            // OrtSession.java, SessionOptions.setMemoryPatternOptimization(boolean)
            setMemoryPatternOptimization(settings.memPattern)
            // OrtSession.java, SessionOptions.addConfigEntry(String, String): session-config entries, e.g.
            // "optimization.disable_specified_optimizers" -> "ConstantFolding;NchwcTransformer"
            for ((key, value) in settings.configEntries) addConfigEntry(key, value)
            // settings.memReuse (enable_mem_reuse) has no Java setter in ORT 1.19.2 (nor in its C API). The
            // default graph's unknown batch dimension leaves ORT's planner nothing to reuse anyway, so the
            // allocations are the same; the planner only spends longer creating the session (sd21: ~13 s).
        }

private fun floats(value: Any?, name: String): FloatArray {
    val tensor = value as? OnnxTensor ?: throw IllegalStateException("output $name is not a tensor")
    val buffer = tensor.floatBuffer  // OnnxTensor.java, getFloatBuffer(): a copy in a new buffer
    val out = FloatArray(buffer.remaining())
    buffer.get(out)
    return out
}

private fun tensor(env: OrtEnvironment, data: FloatArray, shape: LongArray): OnnxTensor =
        OnnxTensor.createTensor(env, FloatBuffer.wrap(data), shape)  // OnnxTensor.java, createTensor(env, FloatBuffer, long[])

private fun tensor(env: OrtEnvironment, data: LongArray, shape: LongArray): OnnxTensor =
        OnnxTensor.createTensor(env, LongBuffer.wrap(data), shape)  // OnnxTensor.java, createTensor(env, LongBuffer, long[])

/** vae_encoder.onnx: image [1,3,R,R] -> latent_mean, latent_std [1,4,R/8,R/8]. */
class OrtEncoder(private val env: OrtEnvironment, bundle: Bundle, threads: Int) : LatentEncoder, AutoCloseable {
    private val opts = options(threads)
    // OrtEnvironment.java, createSession(String modelPath, SessionOptions options)
    private val session: OrtSession = env.createSession(bundle.file(BundleFiles.VAE_ENCODER).path, opts)
    private val side = bundle.hyper.resolution.toLong()

    override fun encode(image: FloatArray): Pair<FloatArray, FloatArray> {
        tensor(env, image, longArrayOf(1, 3, side, side)).use { input ->
            // OrtSession.java, run(Map) -> Result; Result.get(String) -> Optional<OnnxValue>
            session.run(mapOf("image" to input)).use { result ->
                return Pair(floats(result.get("latent_mean").get(), "latent_mean"),
                        floats(result.get("latent_std").get(), "latent_std"))
            }
        }
    }

    override fun close() {
        session.close()
        opts.close()
    }
}

/** precompute.onnx (+ .data): sample [1,4,h,w], timestep int64 [1], encoder_hidden_states [1,77,D] -> hidden. */
class OrtPrecompute(private val env: OrtEnvironment, bundle: Bundle, threads: Int) : HiddenPrecompute, AutoCloseable {
    private val opts = options(threads)
    private val session: OrtSession = env.createSession(bundle.file(BundleFiles.PRECOMPUTE).path, opts)
    private val latentShape = longArrayOf(1) + bundle.latentShape.map { it.toLong() }
    private val encoderShape = longArrayOf(1) + bundle.encoderShape.map { it.toLong() }

    override fun hidden(noisy: FloatArray, timestep: Long, encoderHiddenStates: FloatArray): FloatArray {
        val inputs = linkedMapOf(
                "sample" to tensor(env, noisy, latentShape),
                "timestep" to tensor(env, longArrayOf(timestep), longArrayOf(1)),
                "encoder_hidden_states" to tensor(env, encoderHiddenStates, encoderShape))
        try {
            session.run(inputs).use { result -> return floats(result.get("hidden").get(), "hidden") }
        } finally {
            inputs.values.forEach { it.close() }
        }
    }

    override fun close() {
        session.close()
        opts.close()
    }
}

/**
 * The ORT training artifacts as a core TrainingEngine. `checkpoint` is the bundle's initial
 * checkpoint or the run folder's latest (RunFolder.start decides, after checking its hash): LoRA and
 * optimizer state only (bundle format 2); the frozen weights come from frozen_weights.bin, which the
 * training graph names as its external initializers and which is never written.
 */
class OrtTraining(private val env: OrtEnvironment, bundle: Bundle, checkpoint: File, threads: Int) :
        TrainingEngine, AutoCloseable {
    private val opts = trainingOptions(bundle.trainingSession, threads)
    // OrtEnvironment.java, createTrainingSession(checkpointPath, trainPath, evalPath, optimizerPath, options):
    // loads LoRA and optimizer state from the checkpoint. No eval model unless the bundle asks for one:
    // an eval session would hold a second copy of every frozen weight.
    private val session: OrtTrainingSession = env.createTrainingSession(checkpoint.path,
            bundle.file(BundleFiles.TRAINING_MODEL).path,
            if (bundle.trainingSession.evalSession) bundle.file(BundleFiles.EVAL_MODEL).path else null,
            bundle.file(BundleFiles.OPTIMIZER_MODEL).path, opts)

    override fun setLearningRate(lr: Float) {
        session.setLearningRate(lr)  // OrtTrainingSession.java, setLearningRate(float)
    }

    override fun trainStep(batch: TrainingBatch): Float {
        val inputs = linkedMapOf(
                "sample" to tensor(env, batch.sample, batch.sampleShape),
                "timestep" to tensor(env, batch.timestep, longArrayOf(batch.timestep.size.toLong())),
                "encoder_hidden_states" to tensor(env, batch.encoderHiddenStates, batch.encoderShape),
                "hidden" to tensor(env, batch.hidden, batch.hiddenShape),
                "target" to tensor(env, batch.target, batch.sampleShape))
        try {
            // OrtTrainingSession.java, trainStep(Map, Set<String> requestedOutputs): only the loss
            // (the graph also outputs gradient-accumulation flags the client does not need)
            session.trainStep(inputs, setOf("loss")).use { result ->
                return floats(result.get("loss").get(), "loss")[0]
            }
        } finally {
            inputs.values.forEach { it.close() }
        }
    }

    override fun optimizerStep() = session.optimizerStep()  // OrtTrainingSession.java, optimizerStep()

    override fun lazyResetGrad() = session.lazyResetGrad()  // OrtTrainingSession.java, lazyResetGrad()

    override fun saveCheckpoint(path: File) {
        // OrtTrainingSession.java, saveCheckpoint(Path outputPath, boolean saveOptimizer): writes `path`
        // (and `path`.data when the weights pass 2 GB); RunFolder moves both into place.
        session.saveCheckpoint(path.toPath(), true)
    }

    override fun close() {
        session.close()  // also closes the checkpoint state it owns
        opts.close()
    }

    companion object {
        fun environment(): OrtEnvironment = OrtEnvironment.getEnvironment()  // OrtEnvironment.java, getEnvironment()
    }
}
