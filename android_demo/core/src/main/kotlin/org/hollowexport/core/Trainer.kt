package org.hollowexport.core

import java.io.File

/**
 * The engine that runs the ORT training artifacts. The Android layer implements it with
 * OrtTrainingSession; tests implement it with a recorder. Call order per step (section 5):
 * trainStep, optimizerStep, lazyResetGrad.
 */
interface TrainingEngine {
    fun setLearningRate(lr: Float)
    fun trainStep(batch: TrainingBatch): Float
    fun optimizerStep()
    fun lazyResetGrad()
    /** Write a checkpoint with optimizer state at exactly this path (ORT may add `<path>.data`). */
    fun saveCheckpoint(path: File)
}

class TrainerConfig(val steps: Long, val checkpointEvery: Int = 50, val maxMillis: Long? = null)

class StepReport(val step: Long, val totalSteps: Long, val loss: Float, val etaMillis: Long?, val saved: Boolean)

class TrainResult(val progress: Progress, val finished: Boolean, val stepsThisSession: Long)

/**
 * The training loop of sections 5 and 6 over any engine: data order, inputs, learning rate,
 * checkpoint policy, time budget and stop requests. Resuming gives the same steps as not stopping.
 */
class Trainer(
    private val assembler: BatchAssembler,
    private val run: RunFolder,
    private val schedule: LearningRateSchedule,
    private val config: TrainerConfig,
    private val clock: () -> Long = { System.currentTimeMillis() }
) {
    fun run(engine: TrainingEngine, start: StartPoint, shouldStop: () -> Boolean = { false },
            onStep: (StepReport) -> Unit = {}): TrainResult {
        val started = clock()
        var progress = start.progress
        var step = progress.step
        val first = step
        val eta = EtaEstimator(first, started)
        var lastSave = step
        engine.setLearningRate(schedule.at(step))
        while (step < config.steps) {
            if (shouldStop()) break
            val batch = assembler.batch(step)
            val loss = engine.trainStep(batch)
            engine.optimizerStep()
            engine.lazyResetGrad()
            step++
            progress.losses.add(loss.toDouble())
            val outOfTime = config.maxMillis != null && clock() - started > config.maxMillis
            val save = RunFolder.shouldSave(step, config.steps, config.checkpointEvery, outOfTime)
            if (save) {
                progress = run.save(step, progress.copy(step = step)) { engine.saveCheckpoint(it) }
                lastSave = step
            }
            onStep(StepReport(step, config.steps, loss, eta.etaMillis(step, config.steps, clock()), save))
            if (outOfTime) break
        }
        if (lastSave != step) {
            progress = run.save(step, progress.copy(step = step)) { engine.saveCheckpoint(it) }
        }
        return TrainResult(progress, step >= config.steps, step - first)
    }
}
