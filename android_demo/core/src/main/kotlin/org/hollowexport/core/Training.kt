package org.hollowexport.core

/** DDPM forward noising in float32 (section 3 step 4 and section 5), as diffusers' add_noise. */
object Noising {
    /** sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]), each rounded to float32. */
    fun coefficients(alphasCumprod: FloatArray, timestep: Int): FloatArray {
        val a = alphasCumprod[timestep]
        // sqrt in double then one rounding equals the correctly rounded float32 sqrt
        return floatArrayOf(Math.sqrt(a.toDouble()).toFloat(), Math.sqrt((1.0f - a).toDouble()).toFloat())
    }

    /** sample = sqrt(a)*latent + sqrt(1-a)*noise, every operation rounded to float32. */
    fun noisy(alphasCumprod: FloatArray, timestep: Int, latent: FloatArray, noise: FloatArray): FloatArray {
        val c = coefficients(alphasCumprod, timestep)
        val a = c[0]
        val s = c[1]
        return FloatArray(latent.size) { a * latent[it] + s * noise[it] }
    }

    /** The regression target: the noise (epsilon) or the velocity sqrt(a)*noise - sqrt(1-a)*latent. */
    fun target(alphasCumprod: FloatArray, timestep: Int, latent: FloatArray, noise: FloatArray,
               predictionType: String): FloatArray {
        return when (predictionType) {
            "epsilon" -> noise.copyOf()
            "v_prediction" -> {
                val c = coefficients(alphasCumprod, timestep)
                val a = c[0]
                val s = c[1]
                FloatArray(latent.size) { a * noise[it] - s * latent[it] }
            }
            else -> throw RunException("prediction_type $predictionType is not supported")
        }
    }
}

/** The inputs of one training step, flattened row-major, in the order of the training graph. */
class TrainingBatch(
    val step: Long,
    val records: IntArray,
    val sample: FloatArray,
    val sampleShape: LongArray,
    val timestep: LongArray,
    val encoderHiddenStates: FloatArray,
    val encoderShape: LongArray,
    val hidden: FloatArray,
    val hiddenShape: LongArray,
    val target: FloatArray
) {
    companion object {
        /** User input names of training_model.onnx, in order (hollow_export/bundle.py TRAIN_INPUTS). */
        val INPUT_NAMES = listOf("sample", "timestep", "encoder_hidden_states", "hidden", "target")
    }
}

/** Which record trains at position (step*B + k): order(epoch)[offset] (section 5). */
class DataOrder(val seed: Long, val count: Int) {
    private var cachedEpoch = -1L
    private var cachedOrder = IntArray(0)

    fun record(position: Long): Int {
        val epoch = position / count
        val offset = (position % count).toInt()
        if (epoch != cachedEpoch) {
            cachedOrder = SplitMix64.epochOrder(seed, epoch, count)
            cachedEpoch = epoch
        }
        return cachedOrder[offset]
    }

    fun records(step: Long, batch: Int): IntArray = IntArray(batch) { record(step * batch + it) }
}

/** Assembles step inputs from the buffer (the Python reference's `runtime._batch`). */
class BatchAssembler(
    private val source: (Int) -> Record,
    count: Int,
    private val alphasCumprod: FloatArray,
    private val instance: FloatArray,
    encoderShape: IntArray,
    latentShape: IntArray,
    hiddenShape: IntArray,
    seed: Long,
    val batchSize: Int,
    private val predictionType: String
) {
    private val order = DataOrder(seed, count)
    private val encoderShape = encoderShape.map { it.toLong() }.toLongArray()
    private val latentShape = latentShape.map { it.toLong() }.toLongArray()
    private val hiddenShape = hiddenShape.map { it.toLong() }.toLongArray()

    fun batch(step: Long): TrainingBatch {
        val ids = order.records(step, batchSize)
        val records = ids.map { source(it) }
        val latentSize = records[0].latent.size
        val hiddenSize = records[0].hidden.size
        val sample = FloatArray(batchSize * latentSize)
        val target = FloatArray(batchSize * latentSize)
        val hidden = FloatArray(batchSize * hiddenSize)
        val timesteps = LongArray(batchSize)
        records.forEachIndexed { k, r ->
            Noising.noisy(alphasCumprod, r.timestep, r.latent, r.noise).copyInto(sample, k * latentSize)
            Noising.target(alphasCumprod, r.timestep, r.latent, r.noise, predictionType).copyInto(target, k * latentSize)
            r.hidden.copyInto(hidden, k * hiddenSize)
            timesteps[k] = r.timestep.toLong()
        }
        val ehs = FloatArray(batchSize * instance.size)
        for (k in 0 until batchSize) instance.copyInto(ehs, k * instance.size)
        val b = longArrayOf(batchSize.toLong())
        return TrainingBatch(step, ids, sample, b + latentShape, timesteps, ehs, b + encoderShape,
                hidden, b + hiddenShape, target)
    }

    companion object {
        fun forBuffer(bundle: Bundle, buffer: BufferReader, alphasCumprod: FloatArray, instance: FloatArray,
                      seed: Long): BatchAssembler =
                BatchAssembler({ buffer.get(it) }, buffer.size, alphasCumprod, instance, bundle.encoderShape,
                        buffer.header.latentShape, buffer.header.hiddenShape, seed, bundle.hyper.batchSize,
                        bundle.hyper.predictionType)
    }
}

/** Section 5: the learning rate is constant, hyper.lr, set once after the session is made. */
class LearningRateSchedule(val lr: Double) {
    fun at(step: Long): Float = lr.toFloat()

    /** True when the client must call setLearningRate before `step` (only once: at the start of a session). */
    fun changesAt(step: Long, sessionStart: Long): Boolean = step == sessionStart
}

/** Steps per second over this session, for the "ETA" line. */
class EtaEstimator(private val startStep: Long, private val startMillis: Long) {
    fun etaMillis(step: Long, totalSteps: Long, nowMillis: Long): Long? {
        val done = step - startStep
        if (done <= 0) return null
        val perStep = (nowMillis - startMillis).toDouble() / done
        return Math.round(perStep * (totalSteps - step))
    }
}
