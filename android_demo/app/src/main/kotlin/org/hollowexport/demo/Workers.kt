package org.hollowexport.demo

import android.content.Context
import androidx.work.Constraints
import ai.onnxruntime.OrtException
import androidx.work.Data
import androidx.work.ExistingWorkPolicy
import androidx.work.ListenableWorker
import androidx.work.OneTimeWorkRequestBuilder
import androidx.work.WorkManager
import androidx.work.Worker
import androidx.work.WorkerParameters
import androidx.work.workDataOf
import org.hollowexport.core.BatchAssembler
import org.hollowexport.core.BufferReader
import org.hollowexport.core.Collector
import org.hollowexport.core.HollowException
import org.hollowexport.core.LearningRateSchedule
import org.hollowexport.core.MemoryFloor
import org.hollowexport.core.Photos
import org.hollowexport.core.RunFolder
import org.hollowexport.core.Trainer
import org.hollowexport.core.TrainerConfig
import java.io.File

/**
 * Background work. Both workers run under WorkManager constraints (charging and, for overnight
 * runs, device idle). A regular worker gets about ten minutes per execution, so the trainer works
 * to a time budget, checkpoints, and appends its own continuation; when the system stops it early
 * (unplugged, phone picked up), `isStopped` turns true, the core saves a checkpoint, and
 * WorkManager reschedules it when the constraints hold again. A kill at any moment is safe too:
 * the buffer and the run folder resume exactly (PROTOCOL.md sections 4 and 6).
 */
object Jobs {
    const val NAME = "hollow-export"
    const val KEY_SAMPLES = "samples"
    const val KEY_STEPS = "steps"
    const val KEY_FP16 = "fp16"
    const val KEY_IDLE = "idle"
    const val KEY_PHASE = "phase"
    const val KEY_DONE = "done"
    const val KEY_TOTAL = "total"
    const val KEY_LOSS = "loss"
    const val KEY_ETA = "eta_ms"
    const val KEY_RSS = "rss"
    const val KEY_ERROR = "error"

    /** Collect and train on this phone: checkpoint every 25 steps, ~7 minutes of work per execution. */
    const val CHECKPOINT_EVERY = 25
    const val BUDGET_MILLIS = 7 * 60 * 1000L
    const val SEED = 0L

    fun threads(): Int = Math.max(1, Math.min(4, Runtime.getRuntime().availableProcessors() / 2))

    fun constraints(idle: Boolean): Constraints = Constraints.Builder()
            .setRequiresCharging(true)
            .setRequiresDeviceIdle(idle)  // no backoff policy may be set on idle work
            .setRequiresStorageNotLow(true)
            .build()

    fun start(context: Context, samples: Int, steps: Long, fp16: Boolean, idle: Boolean) {
        val input = workDataOf(KEY_SAMPLES to samples, KEY_STEPS to steps, KEY_FP16 to fp16, KEY_IDLE to idle)
        val collect = OneTimeWorkRequestBuilder<CollectWorker>().setConstraints(constraints(idle)).setInputData(input).build()
        val train = OneTimeWorkRequestBuilder<TrainWorker>().setConstraints(constraints(idle)).setInputData(input).build()
        WorkManager.getInstance(context).beginUniqueWork(NAME, ExistingWorkPolicy.REPLACE, collect).then(train).enqueue()
    }

    /** The next training execution, after the current one (same unique chain). */
    fun continueTraining(context: Context, input: Data) {
        val train = OneTimeWorkRequestBuilder<TrainWorker>()
                .setConstraints(constraints(input.getBoolean(KEY_IDLE, true))).setInputData(input).build()
        WorkManager.getInstance(context).enqueueUniqueWork(NAME, ExistingWorkPolicy.APPEND_OR_REPLACE, train)
    }

    /** Asks the running worker to checkpoint and stop; pending ones are dropped. */
    fun stop(context: Context) {
        WorkManager.getInstance(context).cancelUniqueWork(NAME)
    }

    fun rss(): Long = MemoryFloor.rssFromProcStatus(File("/proc/self/status").readText()) ?: -1L
}

/** A refusal from the core (message names the file and the fix) or an ORT error, shown in the app. */
private fun failed(err: Exception): ListenableWorker.Result =
        ListenableWorker.Result.failure(workDataOf(Jobs.KEY_ERROR to (err.message ?: err.toString())))

class CollectWorker(context: Context, params: WorkerParameters) : Worker(context, params) {
    override fun doWork(): Result {
        try {
            return collect()
        } catch (err: HollowException) {
            return failed(err)
        } catch (err: OrtException) {
            return failed(err)
        }
    }

    private fun collect(): Result {
        val files = AppFiles(applicationContext)
        setProgressAsync(workDataOf(Jobs.KEY_PHASE to "checking bundle"))
        val bundle = files.openBundle()
        val photoFiles = Photos.files(files.photos)
        val collector = Collector(bundle, bundle.alphasCumprod(), bundle.promptStates("class"))
        val samples = inputData.getInt(Jobs.KEY_SAMPLES, bundle.hyper.samples)
        val dtype = if (inputData.getBoolean(Jobs.KEY_FP16, false)) "float16" else "float32"
        val header = collector.header(Photos.digest(photoFiles), samples, Jobs.SEED, dtype)
        if (collector.done(files.buffer, header) < samples) {
            val env = OrtTraining.environment()
            setProgressAsync(workDataOf(Jobs.KEY_PHASE to "encoding photos"))
            val images = photoFiles.map { PhotoDecoder.decode(it, bundle.hyper.resolution) }
            // one graph in memory at a time: the VAE encoder for the latents, then the precompute graph
            val latents = OrtEncoder(env, bundle, Jobs.threads()).use { collector.latents(it, images, header.seed) }
            OrtPrecompute(env, bundle, Jobs.threads()).use { precompute ->
                collector.collect(latents, files.buffer, header, precompute, { isStopped }) { r ->
                    setProgressAsync(workDataOf(Jobs.KEY_PHASE to "collecting", Jobs.KEY_DONE to r.done.toLong(),
                            Jobs.KEY_TOTAL to r.capacity.toLong(), Jobs.KEY_RSS to Jobs.rss()))
                }
            }
        }
        // when stopped, the Result is ignored and WorkManager runs this worker again later
        return Result.success()
    }
}

class TrainWorker(context: Context, params: WorkerParameters) : Worker(context, params) {
    override fun doWork(): Result {
        try {
            return train()
        } catch (err: HollowException) {
            return failed(err)
        } catch (err: OrtException) {
            return failed(err)
        }
    }

    private fun train(): Result {
        val files = AppFiles(applicationContext)
        val bundle = files.openBundle()
        val steps = inputData.getLong(Jobs.KEY_STEPS, bundle.hyper.steps.toLong())
        BufferReader(files.buffer, bundle.id).use { buffer ->  // every record checked once, here
            val run = RunFolder(files.run)
            val start = run.start(bundle, buffer.header)
            if (start.progress.step >= steps) return Result.success()
            val assembler = BatchAssembler.forBuffer(bundle, buffer, bundle.alphasCumprod(),
                    bundle.promptStates("instance"), start.progress.seed)
            val trainer = Trainer(assembler, run, LearningRateSchedule(bundle.hyper.lr),
                    TrainerConfig(steps, Jobs.CHECKPOINT_EVERY, Jobs.BUDGET_MILLIS))
            val result = OrtTraining(OrtTraining.environment(), bundle, start.checkpoint, Jobs.threads()).use { engine ->
                trainer.run(engine, start, { isStopped }) { r ->
                    setProgressAsync(workDataOf(Jobs.KEY_PHASE to "training", Jobs.KEY_DONE to r.step,
                            Jobs.KEY_TOTAL to r.totalSteps, Jobs.KEY_LOSS to r.loss, Jobs.KEY_ETA to (r.etaMillis ?: -1L),
                            Jobs.KEY_RSS to Jobs.rss()))
                }
            }
            if (!result.finished && !isStopped) Jobs.continueTraining(applicationContext, inputData)
        }
        return Result.success()
    }
}
