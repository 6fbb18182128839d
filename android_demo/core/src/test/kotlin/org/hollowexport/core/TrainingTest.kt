package org.hollowexport.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import java.io.File
import java.io.IOException

class TrainingTest {
    private val dir = TestBundles.tempDir("train")
    private val bundle = TestBundles.make(File(dir, "bundle"))
    private val bufferFile = File(dir, "buffer.bin")
    private val header = TestBundles.buffer(bundle, bufferFile, 6)

    /** Checks the call order, records what it trained on, writes checkpoints holding the step count. */
    class FakeEngine(private val failSaveAt: Long? = null) : TrainingEngine {
        val calls = ArrayList<String>()
        val records = ArrayList<Int>()
        var steps = 0L
        var lr: Float? = null

        override fun setLearningRate(lr: Float) {
            this.lr = lr
            calls.add("lr")
        }

        override fun trainStep(batch: TrainingBatch): Float {
            calls.add("train")
            records.addAll(batch.records.toList())
            return 1.0f / (batch.step + 1)
        }

        override fun optimizerStep() {
            assertEquals("train", calls.last())
            calls.add("opt")
            steps++
        }

        override fun lazyResetGrad() {
            assertEquals("opt", calls.last())
            calls.add("reset")
        }

        override fun saveCheckpoint(path: File) {
            if (failSaveAt != null && steps >= failSaveAt) throw IOException("No space left on device")
            path.writeText("state after $steps steps")
            if (steps == 4L) File(path.path + ".data").writeText("big weights")
        }
    }

    private fun trainer(run: RunFolder, steps: Long, every: Int = 3, maxMillis: Long? = null,
                        clock: () -> Long = { System.currentTimeMillis() }): Pair<Trainer, BufferReader> {
        val buffer = BufferReader(bufferFile, bundle.id)
        val assembler = BatchAssembler.forBuffer(bundle, buffer, bundle.alphasCumprod(), bundle.promptStates("instance"),
                bundle.hyper.seed)
        return Pair(Trainer(assembler, run, LearningRateSchedule(bundle.hyper.lr), TrainerConfig(steps, every, maxMillis),
                clock), buffer)
    }

    @Test
    fun noisingIsFloat32() {
        val acp = floatArrayOf(0.9f, 0.5f)
        val latent = floatArrayOf(1f, -2f, 0.3f)
        val noise = floatArrayOf(0.5f, 0.25f, -1f)
        val a = Math.sqrt(0.5).toFloat()
        val s = Math.sqrt((1f - 0.5f).toDouble()).toFloat()
        assertArrayEquals(FloatArray(3) { a * latent[it] + s * noise[it] }, Noising.noisy(acp, 1, latent, noise), 0f)
        assertArrayEquals(noise, Noising.target(acp, 1, latent, noise, "epsilon"), 0f)
        assertArrayEquals(FloatArray(3) { a * noise[it] - s * latent[it] },
                Noising.target(acp, 1, latent, noise, "v_prediction"), 0f)
        try {
            Noising.target(acp, 1, latent, noise, "sample")
            fail()
        } catch (err: RunException) {
            assertTrue(err.message!!.contains("not supported"))
        }
    }

    @Test
    fun dataOrderWalksEpochOrders() {
        val order = DataOrder(5, 6)
        val e0 = SplitMix64.epochOrder(5, 0, 6)
        val e1 = SplitMix64.epochOrder(5, 1, 6)
        assertEquals(e0.toList() + e1.toList(), (0L until 12L).map { order.record(it) })
        assertEquals(listOf(e1[2], e1[3]), order.records(4, 2).toList())  // batch 2: positions 8, 9
    }

    @Test
    fun batchesStackRecordsAndRepeatThePrompt() {
        val b2 = TestBundles.make(File(dir, "bundle2"), batchSize = 2)
        val file = File(dir, "buffer2.bin")
        TestBundles.buffer(b2, file, 6)
        BufferReader(file, b2.id).use { buffer ->
            val batch = BatchAssembler.forBuffer(b2, buffer, b2.alphasCumprod(), b2.promptStates("instance"), 0).batch(1)
            assertEquals(listOf(2L, 4L, 2L, 2L), batch.sampleShape.toList())
            assertEquals(listOf(2L, 2L, 3L), batch.encoderShape.toList())
            assertEquals(listOf(2L, 3L, 2L), batch.hiddenShape.toList())
            assertEquals(listOf(1f, 2f, 3f, 4f, 5f, 6f, 1f, 2f, 3f, 4f, 5f, 6f), batch.encoderHiddenStates.toList())
            val order = SplitMix64.epochOrder(0, 0, 6)
            assertEquals(listOf(order[2], order[3]), batch.records.toList())
            val r = buffer.get(order[3])
            assertEquals(r.timestep.toLong(), batch.timestep[1])
            assertArrayEquals(Noising.noisy(b2.alphasCumprod(), r.timestep, r.latent, r.noise),
                    batch.sample.copyOfRange(16, 32), 0f)
            assertArrayEquals(r.hidden, batch.hidden.copyOfRange(6, 12), 0f)
        }
    }

    @Test
    fun checkpointsEveryNStepsKeepingTwoAndResumesExactly() {
        val run = RunFolder(File(dir, "run"))
        val start = run.start(bundle, header)
        assertTrue(start.fresh)
        assertEquals(bundle.file("checkpoint"), start.checkpoint)
        val engine = FakeEngine()
        val (t, buffer) = trainer(run, 10)
        var stopAt = 7L
        var current = 0L
        val first = t.run(engine, start, { current >= stopAt }) { current = it.step }
        buffer.close()
        assertEquals(7L, first.progress.step)
        assertFalse(first.finished)
        assertEquals(listOf("checkpoint-000006", "checkpoint-000007", "progress.json"), run.dir.list()!!.sorted())
        assertEquals("checkpoint-000006", first.progress.previous)
        assertEquals(7, first.progress.losses.size)
        assertEquals(0.001f, engine.lr)
        assertEquals(listOf("lr", "train", "opt", "reset"), engine.calls.take(4))

        // a second session resumes at step 7 from checkpoint-000007 and finishes
        val resumed = run.start(bundle, header)
        assertFalse(resumed.fresh)
        assertEquals("checkpoint-000007", resumed.checkpoint.name)
        val engine2 = FakeEngine()
        val (t2, buffer2) = trainer(run, 10)
        stopAt = Long.MAX_VALUE
        val second = t2.run(engine2, resumed)
        buffer2.close()
        assertTrue(second.finished)
        assertEquals(10L, second.progress.step)
        assertEquals(listOf("checkpoint-000009", "checkpoint-000010", "progress.json"), run.dir.list()!!.sorted())

        // the same as one uninterrupted run
        val straight = RunFolder(File(dir, "straight"))
        val engine3 = FakeEngine()
        val (t3, buffer3) = trainer(straight, 10)
        val whole = t3.run(engine3, straight.start(bundle, header))
        buffer3.close()
        assertEquals(engine3.records, engine.records + engine2.records)
        assertEquals(whole.progress.losses, second.progress.losses)

        val progress = run.readProgress()!!
        assertEquals(bundle.id, progress.bundle)
        assertEquals(3L, progress.bufferSeed)
        assertEquals(Hashes.sha256(File(run.dir, "checkpoint-000010")), progress.sha256)
        assertNull(progress.dataSha256)
        assertEquals(listOf(0L, 7L), Json.parse(progress.extra["starts"]!!, "starts").asJsonArray.map { it.asLong })
        assertEquals(Json.parseObject(Json.compact(RunFolder.bufferIdentity(header)), "identity"),
                Json.parseObject(progress.extra["buffer"]!!, "buffer"))  // where each session began, on what
    }

    /** A run folder trained 3 steps over the test buffer. */
    private fun trainedRun(name: String): RunFolder {
        val run = RunFolder(File(dir, name))
        val (t, buffer) = trainer(run, 3)
        t.run(FakeEngine(), run.start(bundle, header))
        buffer.close()
        return run
    }

    @Test
    fun refusesToResumeOverAnotherBuffer() {
        val run = trainedRun("run-buffer")
        val fp16 = TestBundles.buffer(bundle, File(dir, "buffer-fp16.bin"), 6, "float16")
        val bigger = TestBundles.buffer(bundle, File(dir, "buffer-8.bin"), 8)
        for ((other, what) in listOf(fp16 to "dtype", bigger to "capacity")) {
            try {
                run.start(bundle, other)
                fail()
            } catch (err: RunException) {
                assertTrue(err.message!!, err.message!!.contains("trained on another buffer ($what differ)"))
            }
        }
        assertFalse(run.start(bundle, header).fresh)  // the buffer it started with
        // a run folder from before runs recorded their buffer: only the seed is compared
        val legacy = run.readProgress()!!
        fun writeLegacy(seed: Long) = run.progressFile.writeText(Progress(legacy.bundle, seed, legacy.seed,
                legacy.losses, legacy.step, legacy.checkpoint, legacy.previous, legacy.sha256, legacy.dataSha256).toJson())
        writeLegacy(4)
        try {
            run.start(bundle, header)
            fail()
        } catch (err: RunException) {
            assertTrue(err.message!!, err.message!!.contains("trained on another buffer (seed differ)"))
        }
        // ... so with the seed matching, another capacity passes there (nothing else was recorded)
        writeLegacy(3)
        assertFalse(run.start(bundle, bigger).fresh)
        // a recorded identity written by another JSON writer: numbers compare by value, null counts as absent
        val written = run.progressFile.readText()
        run.progressFile.writeText(written.replace("\"data_sha256\"", "\"buffer\": {\"seed\": 3.0, \"capacity\": 6e0}, " +
                "\"data_sha256\""))
        assertFalse(run.start(bundle, header).fresh)
        run.progressFile.writeText(written.replace("\"data_sha256\"", "\"buffer\": null, \"data_sha256\""))
        assertFalse(run.start(bundle, header).fresh)
    }

    @Test
    fun dataFilesAreMovedHashedAndPruned() {
        val run = RunFolder(File(dir, "run-data"))
        val (t, buffer) = trainer(run, 8, every = 2)
        t.run(FakeEngine(), run.start(bundle, header)) { r -> if (r.step == 4L) {
            val p = run.readProgress()!!
            assertEquals(Hashes.sha256(File(run.dir, "checkpoint-000004.data")), p.dataSha256)
        } }
        buffer.close()
        // checkpoint-000004.data went with checkpoint-000004; nothing left in scratch folders
        assertEquals(listOf("checkpoint-000006", "checkpoint-000008", "progress.json"), run.dir.list()!!.sorted())
    }

    @Test
    fun timeBudgetSavesAndStops() {
        var now = 0L
        val run = RunFolder(File(dir, "run-time"))
        val (t, buffer) = trainer(run, 100, every = 50, maxMillis = 1000, clock = { now += 300; now })
        val result = t.run(FakeEngine(), run.start(bundle, header))
        buffer.close()
        assertFalse(result.finished)
        assertEquals(result.progress.step, run.readProgress()!!.step)
        assertTrue(result.progress.step in 1L..5L)
    }

    @Test
    fun aFailedSaveLeavesThePreviousCheckpointValid() {
        val run = RunFolder(File(dir, "run-full"))
        val (t, buffer) = trainer(run, 10, every = 3)
        try {
            t.run(FakeEngine(failSaveAt = 6), run.start(bundle, header))
            fail("expected the save to fail")
        } catch (err: RunException) {
            assertTrue(err.message!!.contains("No space left on device"))
            assertTrue(err.message!!.contains("resumes from the last saved checkpoint"))
        }
        buffer.close()
        assertEquals(listOf("checkpoint-000003", "progress.json"), run.dir.list()!!.sorted())
        val start = run.start(bundle, header)
        assertEquals(3L, start.progress.step)
        assertEquals("checkpoint-000003", start.checkpoint.name)
    }

    @Test
    fun refusesTamperedCheckpointsAndOtherBundles() {
        val run = trainedRun("run-bad")
        File(run.dir, "checkpoint-000003").appendText("x")
        try {
            run.start(bundle, header)
            fail()
        } catch (err: RunException) {
            assertTrue(err.message!!.contains("checkpoint-000003 is missing or fails its hash"))
        }
        val other = TestBundles.make(File(dir, "other"), seed = 9)
        try {
            run.start(other, header)
            fail()
        } catch (err: RunException) {
            assertTrue(err.message!!.contains("belongs to another bundle"))
        }
        assertEquals("checkpoint-000012", RunFolder.checkpointName(12))
        assertTrue(RunFolder.shouldSave(50, 1000, 50, false))
        assertTrue(RunFolder.shouldSave(1000, 1000, 50, false))
        assertTrue(RunFolder.shouldSave(7, 1000, 50, true))
        assertFalse(RunFolder.shouldSave(7, 1000, 50, false))
    }

    @Test
    fun progressKeepsUnknownFields() {
        val run = RunFolder(File(dir, "run-extra"))
        run.dir.mkdirs()
        run.progressFile.writeText("{\"bundle\": \"b\", \"buffer_seed\": 1, \"seed\": 0, \"losses\": [0.5, 0.25], " +
                "\"step\": 2, \"checkpoint\": \"checkpoint-000002\", \"previous\": null, \"sha256\": \"s\", " +
                "\"data_sha256\": null, \"peak_rss_bytes\": 123}")
        val p = run.readProgress()!!
        assertEquals(listOf(0.5, 0.25), p.losses)
        assertTrue(p.toJson().contains("\"peak_rss_bytes\": 123"))
        run.progressFile.writeText("{oops")
        try {
            run.readProgress()
            fail()
        } catch (err: RunException) {
            assertTrue(err.message!!.contains("is damaged"))
        }
    }
}
