package org.hollowexport.core

/**
 * Parameter-memory lower bounds from a manifest's `memory` block, for "will this phone fit":
 * what the weights alone take in each phase. Activations, ORT arenas and the app come on top,
 * so these are floors, not predictions; measured peaks come from `hollow-export bench ort`.
 */
class MemoryFloor(memory: Map<String, Long>) {
    val vaeEncoder = memory["vae_encoder_param_bytes"] ?: 0L
    val precompute = memory["precompute_param_bytes"] ?: 0L
    val hollowedBase = memory["hollowed_base_param_bytes"] ?: 0L
    val lora = memory["lora_param_bytes"] ?: 0L
    val optimizerState = memory["optimizer_state_bytes"] ?: 2 * lora
    val bufferPerSample = memory["buffer_bytes_per_sample_fp32"] ?: 0L

    /** Collection runs the VAE encoder, then the precompute graph: one of them at a time. */
    val collection: Long get() = Math.max(vaeEncoder, precompute)

    /** Training holds the hollowed base, the LoRA weights, their gradients and the AdamW moments. */
    val training: Long get() = hollowedBase + lora + lora + optimizerState

    companion object {
        /** VmRSS of /proc/self/status text, in bytes (null when absent). */
        fun rssFromProcStatus(text: String): Long? {
            for (line in text.lineSequence()) {
                if (line.startsWith("VmRSS:")) {
                    val parts = line.substring(6).trim().split(Regex("\\s+"))
                    val kb = parts[0].toLongOrNull() ?: return null
                    return kb * 1024
                }
            }
            return null
        }
    }
}
