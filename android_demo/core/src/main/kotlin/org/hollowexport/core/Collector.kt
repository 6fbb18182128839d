package org.hollowexport.core

import java.io.File

/** vae_encoder.onnx on one photo: input [1,3,R,R]; outputs latent_mean and latent_std [1,4,h,w]. */
interface LatentEncoder {
    fun encode(image: FloatArray): Pair<FloatArray, FloatArray>
}

/** precompute.onnx on one sample: sample [1,4,h,w], timestep int64 [1], states [1,77,D] -> hidden. */
interface HiddenPrecompute {
    fun hidden(noisy: FloatArray, timestep: Long, encoderHiddenStates: FloatArray): FloatArray
}

class CollectReport(val done: Int, val capacity: Int)

/**
 * Section 3, end to end over any engine: photo latents with LATENT-stream noise, timesteps,
 * sample noise (rounded to float16 first for a float16 buffer), noisy latents, hidden states,
 * durable appends, resume of a partly written buffer.
 */
class Collector(private val bundle: Bundle, private val alphasCumprod: FloatArray, private val classStates: FloatArray) {

    fun header(photoDigest: String, samples: Int, seed: Long, dtype: String): BufferHeader {
        if (samples < 1) throw BufferException("samples must be at least 1 (got $samples)")
        return BufferHeader(bundle.id, photoDigest, samples, seed, dtype, bundle.latentShape, bundle.bufferShape)
    }

    /** Photo latent p: mean + std * normal(key(seed, LATENT, p)), float32. */
    fun latent(encoder: LatentEncoder, image: FloatArray, seed: Long, photo: Int): FloatArray {
        val (mean, std) = encoder.encode(image)
        val eps = SplitMix64.normals(SplitMix64.key(seed, SplitMix64.LATENT, photo.toLong()), mean.size)
        return FloatArray(mean.size) { mean[it] + std[it] * eps[it] }
    }

    /** Every photo's latent, in protocol order (the encoder session can be closed afterwards). */
    fun latents(encoder: LatentEncoder, images: List<FloatArray>, seed: Long): List<FloatArray> {
        if (images.isEmpty()) throw PhotoException("no photos to collect from")
        return images.mapIndexed { p, image -> latent(encoder, image, seed, p) }
    }

    /** Records already in `buffer` for this header (creating it, or cutting a torn record off). */
    fun done(buffer: File, header: BufferHeader): Int = BufferWriter.open(buffer, header).use { it.done }

    /**
     * Fill `buffer` up to header.capacity from the photo latents. Returns the number of records in
     * the buffer (less than capacity when stopped).
     */
    fun collect(latents: List<FloatArray>, buffer: File, header: BufferHeader, precompute: HiddenPrecompute,
                shouldStop: () -> Boolean = { false }, onRecord: (CollectReport) -> Unit = {}): Int {
        if (latents.isEmpty()) throw PhotoException("no photos to collect from")
        BufferWriter.open(buffer, header).use { writer ->
            if (writer.complete) return writer.done
            val timesteps = SplitMix64.timesteps(header.seed, header.capacity, alphasCumprod.size)
            for (i in writer.done until header.capacity) {
                if (shouldStop()) break
                val latent = latents[i % latents.size]
                var noise = SplitMix64.normals(SplitMix64.key(header.seed, SplitMix64.NOISE, i.toLong()), header.latentCount)
                if (header.dtype == "float16") noise = FloatArray(noise.size) { Half.round(noise[it]) }
                val noisy = Noising.noisy(alphasCumprod, timesteps[i], latent, noise)
                val hidden = precompute.hidden(noisy, timesteps[i].toLong(), classStates)
                if (hidden.size != header.hiddenCount) {
                    throw BufferException("precompute.onnx returned ${hidden.size} values, the bundle says " +
                            "${header.hiddenCount}; rebuild the bundle")
                }
                writer.append(Record(i, timesteps[i], latent, noise, hidden))
                onRecord(CollectReport(writer.done, header.capacity))
            }
            return writer.done
        }
    }
}
