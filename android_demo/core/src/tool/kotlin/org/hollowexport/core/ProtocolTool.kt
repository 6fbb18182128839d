package org.hollowexport.core

import java.io.File
import java.io.FileOutputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import javax.imageio.ImageIO
import kotlin.system.exitProcess

/**
 * Command-line entry for the cross-language tests (tests/test_kotlin_core.py): each subcommand
 * runs one piece of the protocol core and prints JSON on stdout. Arrays go to binary files
 * (float32 little-endian) named by --out. Exit 2 with {"error": ...} on a refusal.
 * Desktop JVM only (javax.imageio decodes the test photos), so it lives in src/tool, outside the
 * sources the Android build compiles; run_tests.sh compiles it with the core.
 */
object ProtocolTool {
    @JvmStatic
    fun main(args: Array<String>) {
        if (args.isEmpty()) {
            System.err.println("usage: ProtocolTool <command> [--key value ...]")
            exitProcess(64)
        }
        val opts = HashMap<String, String>()
        var i = 1
        while (i < args.size) {
            val k = args[i]
            require(k.startsWith("--")) { "expected --option, got $k" }
            if (i + 1 < args.size && !args[i + 1].startsWith("--")) {
                opts[k.substring(2)] = args[i + 1]
                i += 2
            } else {
                opts[k.substring(2)] = "true"
                i += 1
            }
        }
        try {
            val result = run(args[0], Options(opts))
            println(Json.compact(result))
        } catch (err: HollowException) {
            println(Json.compact(linkedMapOf("error" to err.message, "kind" to err.javaClass.simpleName)))
            exitProcess(2)
        }
    }

    class Options(private val m: Map<String, String>) {
        fun str(k: String): String = m[k] ?: throw IllegalArgumentException("missing --$k")
        fun opt(k: String): String? = m[k]
        /** Integers up to 2^64 - 1 (seeds are unsigned 64-bit in the protocol). */
        fun long(k: String): Long = java.lang.Long.parseUnsignedLong(str(k))
        fun int(k: String): Int = str(k).toInt()
        fun file(k: String): File = File(str(k))
        fun flag(k: String): Boolean = m[k] == "true"
    }

    fun run(command: String, o: Options): Any? = when (command) {
        "streams" -> streams(o)
        "order" -> linkedMapOf("order" to SplitMix64.epochOrder(o.long("seed"), o.long("epoch"), o.int("count")))
        "timesteps" -> linkedMapOf("timesteps" to SplitMix64.timesteps(o.long("seed"), o.int("count"), o.int("T")))
        "verify-bundle" -> verifyBundle(o)
        "read-buffer" -> readBuffer(o)
        "write-buffer" -> writeBuffer(o)
        "train-inputs" -> trainInputs(o)
        "fake-train" -> fakeTrain(o)
        "write-lora" -> writeLora(o)
        "checkpoint-params" -> checkpointParams(o)
        "preprocess" -> preprocess(o)
        "fake-collect" -> fakeCollect(o)
        "half" -> half(o)
        "json-float" -> linkedMapOf("repr" to o.str("values").split(",").map { Json.pyFloat(it.toDouble()) })
        else -> throw IllegalArgumentException("unknown command $command")
    }

    private fun streams(o: Options): Map<String, Any?> {
        val key = SplitMix64.key(o.long("seed"), o.long("stream"), o.long("index"))
        val count = o.int("count")
        return linkedMapOf(
                "key" to SplitMix64.unsigned(key),
                "u64" to (0 until count).map { SplitMix64.unsigned(SplitMix64.u64(key, it.toLong())) },
                "normal_bits" to SplitMix64.normals(key, count).map { java.lang.Float.floatToRawIntBits(it) })
    }

    private fun verifyBundle(o: Options): Map<String, Any?> {
        val b = Bundle.open(o.file("bundle"))
        return linkedMapOf("ok" to true, "id" to b.id, "files" to b.files.size, "lora" to b.lora.size,
                "latent_shape" to b.latentShape, "buffer_shape" to b.bufferShape, "lr" to b.hyper.lr,
                "rank" to b.hyper.rankText, "alpha" to b.hyper.alphaText,
                "training_floor" to MemoryFloor(b.memory).training,
                "frozen" to linkedMapOf("file" to b.frozen.file, "dtype" to b.frozen.dtype, "sha256" to b.frozen.sha256),
                "training_session" to linkedMapOf("enable_cpu_mem_arena" to b.trainingSession.cpuArena,
                        "enable_mem_pattern" to b.trainingSession.memPattern,
                        "enable_mem_reuse" to b.trainingSession.memReuse,
                        "config_entries" to b.trainingSession.configEntries,
                        "eval_session" to b.trainingSession.evalSession))
    }

    private fun floatsOut(file: File, arrays: List<FloatArray>) {
        FileOutputStream(file).use { out ->
            for (a in arrays) {
                val buf = ByteBuffer.allocate(a.size * 4).order(ByteOrder.LITTLE_ENDIAN)
                buf.asFloatBuffer().put(a)
                out.write(buf.array())
            }
        }
    }

    private fun floatsIn(file: File): FloatArray {
        val bytes = file.readBytes()
        val out = FloatArray(bytes.size / 4)
        ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer().get(out)
        return out
    }

    private fun readBuffer(o: Options): Map<String, Any?> {
        BufferReader(o.file("buffer"), o.str("bundle-id")).use { r ->
            val records = (0 until r.size).map { r.get(it) }
            floatsOut(o.file("out"), records.flatMap { listOf(it.latent, it.noise, it.hidden) })
            val h = r.header
            return linkedMapOf("capacity" to h.capacity, "seed" to h.seed, "dtype" to h.dtype,
                    "photos" to h.photos, "record_bytes" to h.recordBytes, "header_json" to h.json(),
                    "indices" to records.map { it.index }, "timesteps" to records.map { it.timestep })
        }
    }

    private fun headerFrom(file: File): BufferHeader {
        val j = Json.parseObject(file.readText(), file.path)
        val w = file.path
        return BufferHeader(Json.str(j, "bundle", w), Json.str(j, "photos", w), Json.int(j, "capacity", w),
                Json.long(j, "seed", w), Json.str(j, "dtype", w), Json.ints(j, "latent_shape", w),
                Json.ints(j, "hidden_shape", w))
    }

    /** Records from Python: --records holds latent|noise|hidden float32 per record, --timesteps a list. */
    private fun writeBuffer(o: Options): Map<String, Any?> {
        val header = headerFrom(o.file("header"))
        val values = floatsIn(o.file("records"))
        val timesteps = o.str("timesteps").split(",").map { it.toInt() }
        val l = header.latentCount
        val h = header.hiddenCount
        val per = 2 * l + h
        val stopAfter = o.opt("stop-after")?.toInt() ?: header.capacity
        var done: Int
        BufferWriter.open(o.file("out"), header).use { w ->
            val resumedAt = w.done
            for (i in w.done until Math.min(stopAfter, header.capacity)) {
                val base = i * per
                w.append(Record(i, timesteps[i], values.copyOfRange(base, base + l),
                        values.copyOfRange(base + l, base + 2 * l), values.copyOfRange(base + 2 * l, base + per)))
            }
            done = w.done
            if (o.flag("torn")) {
                FileOutputStream(o.file("out"), true).use { it.write(ByteArray(header.recordBytes / 2) { 7 }) }
            }
            return linkedMapOf("resumed_at" to resumedAt, "done" to done, "record_bytes" to header.recordBytes)
        }
    }

    private fun trainInputs(o: Options): Map<String, Any?> {
        val bundle = Bundle.open(o.file("bundle"), verify = false)
        BufferReader(o.file("buffer"), bundle.id).use { buffer ->
            val predictionType = o.opt("prediction-type") ?: bundle.hyper.predictionType
            val assembler = BatchAssembler({ buffer.get(it) }, buffer.size, bundle.alphasCumprod(),
                    bundle.promptStates("instance"), bundle.encoderShape, buffer.header.latentShape,
                    buffer.header.hiddenShape, bundle.hyper.seed, o.opt("batch")?.toInt() ?: bundle.hyper.batchSize,
                    predictionType)
            val steps = o.long("steps")
            val first = o.opt("first")?.toLong() ?: 0L
            val batches = (first until first + steps).map { assembler.batch(it) }
            floatsOut(o.file("out"), batches.flatMap { listOf(it.sample, it.target, it.hidden, it.encoderHiddenStates) })
            return linkedMapOf("records" to batches.map { it.records.toList() },
                    "timesteps" to batches.map { it.timestep.toList() },
                    "sample_shape" to batches[0].sampleShape, "hidden_shape" to batches[0].hiddenShape,
                    "encoder_shape" to batches[0].encoderShape, "lr" to LearningRateSchedule(bundle.hyper.lr).at(0).toDouble())
        }
    }

    /** An engine that checks the call order and "saves" the bundle's initial checkpoint. */
    class RecordingEngine(private val initial: File) : TrainingEngine {
        val calls = ArrayList<String>()
        val records = ArrayList<List<Int>>()
        var lr: Float? = null

        override fun setLearningRate(lr: Float) {
            this.lr = lr
            calls.add("setLearningRate")
        }

        override fun trainStep(batch: TrainingBatch): Float {
            check(calls.isEmpty() || calls.last() == "lazyResetGrad" || calls.last() == "setLearningRate" ||
                    calls.last() == "saveCheckpoint") { "trainStep after ${calls.last()}" }
            calls.add("trainStep")
            records.add(batch.records.toList())
            return 0.25f + batch.step * 0.001f
        }

        override fun optimizerStep() {
            check(calls.last() == "trainStep")
            calls.add("optimizerStep")
        }

        override fun lazyResetGrad() {
            check(calls.last() == "optimizerStep")
            calls.add("lazyResetGrad")
        }

        override fun saveCheckpoint(path: File) {
            calls.add("saveCheckpoint")
            initial.copyTo(path, overwrite = true)
        }
    }

    private fun fakeTrain(o: Options): Map<String, Any?> {
        val bundle = Bundle.open(o.file("bundle"))
        BufferReader(o.file("buffer"), bundle.id).use { buffer ->
            val run = RunFolder(o.file("run"))
            val start = run.start(bundle, buffer.header)
            val assembler = BatchAssembler.forBuffer(bundle, buffer, bundle.alphasCumprod(),
                    bundle.promptStates("instance"), start.progress.seed)
            val config = TrainerConfig(o.long("steps"), o.opt("every")?.toInt() ?: 50)
            val engine = RecordingEngine(bundle.file(BundleFiles.CHECKPOINT))
            val stopAt = o.opt("stop-at")?.toLong()
            var current = start.progress.step
            val result = Trainer(assembler, run, LearningRateSchedule(bundle.hyper.lr), config)
                    .run(engine, start, { stopAt != null && current >= stopAt }) { current = it.step }
            return linkedMapOf("step" to result.progress.step, "finished" to result.finished,
                    "checkpoint" to result.progress.checkpoint, "previous" to result.progress.previous,
                    "loaded" to start.checkpoint.name, "records" to engine.records, "calls" to engine.calls.size,
                    "lr" to engine.lr?.toDouble(),
                    "files" to (run.dir.list() ?: emptyArray()).sorted())
        }
    }

    private fun writeLora(o: Options): Map<String, Any?> {
        val bundle = Bundle.open(o.file("bundle"))
        val out = o.file("out")
        val tensorsFile = o.opt("tensors")
        if (tensorsFile != null) {
            val st = SafetensorsFile.open(File(tensorsFile))
            val tensors = bundle.lora.associate { e ->
                val t = st.tensor(e.unetName) ?: throw RunException("${st.file} lacks ${e.unetName}")
                e.unetName to FloatTensor(t.shape, st.readFloats(t))
            }
            return LoraExport.write(bundle, tensors, o.opt("checkpoint-name") ?: "given", out)
        }
        return LoraExport.export(bundle, o.file("checkpoint"), out)
    }

    private fun checkpointParams(o: Options): Map<String, Any?> {
        val ckpt = OrtCheckpoint.open(o.file("checkpoint"))
        val names = o.str("names").split(",")
        val tensors = names.map { ckpt.floatTensor(it) ?: throw RunException("no parameter $it") }
        floatsOut(o.file("out"), tensors.map { it.data })
        return linkedMapOf("version" to ckpt.version, "trainable" to ckpt.trainable.size,
                "frozen" to ckpt.frozenCount, "shapes" to tensors.map { it.shape })
    }

    private fun decode(file: File): Triple<IntArray, Int, Int> {
        val img = ImageIO.read(file) ?: throw PhotoException("$file is not a readable image")
        val w = img.width
        val h = img.height
        return Triple(img.getRGB(0, 0, w, h, null, 0, w), w, h)
    }

    private fun preprocess(o: Options): Map<String, Any?> {
        val files = Photos.files(o.file("images"), o.opt("minimum")?.toInt() ?: Photos.MIN_PHOTOS)
        val res = o.int("resolution")
        floatsOut(o.file("out"), files.map { val (px, w, h) = decode(it); Photos.preprocess(px, w, h, res) })
        return linkedMapOf("files" to files.map { it.name }, "digest" to Photos.digest(files))
    }

    /** The fake engines of the collection cross-check (the Python test fakes ORT the same way). */
    class FakeEncoder(private val resolution: Int) : LatentEncoder {
        override fun encode(image: FloatArray): Pair<FloatArray, FloatArray> {
            val h = resolution / 8
            val n = resolution * resolution
            val mean = FloatArray(4 * h * h)
            for (c in 0 until 4) for (y in 0 until h) for (x in 0 until h) {
                mean[(c * h + y) * h + x] = image[(c % 3) * n + (8 * y) * resolution + 8 * x] * 0.5f
            }
            return Pair(mean, FloatArray(mean.size) { 0.25f })
        }
    }

    class FakePrecompute(private val hiddenCount: Int) : HiddenPrecompute {
        override fun hidden(noisy: FloatArray, timestep: Long, encoderHiddenStates: FloatArray): FloatArray =
                FloatArray(hiddenCount) { noisy[it % noisy.size] * timestep.toFloat() + encoderHiddenStates[it % encoderHiddenStates.size] }
    }

    private fun fakeCollect(o: Options): Map<String, Any?> {
        val bundle = Bundle.open(o.file("bundle"))
        val files = Photos.files(o.file("images"))
        val res = bundle.hyper.resolution
        val images = files.map { val (px, w, h) = decode(it); Photos.preprocess(px, w, h, res) }
        val collector = Collector(bundle, bundle.alphasCumprod(), bundle.promptStates("class"))
        val header = collector.header(Photos.digest(files), o.int("samples"), o.long("seed"), o.opt("dtype") ?: "float32")
        val stopAfter = o.opt("stop-after")?.toInt()
        var done = collector.done(o.file("buffer"), header)
        val latents = collector.latents(FakeEncoder(res), images, header.seed)
        val count = collector.collect(latents, o.file("buffer"), header, FakePrecompute(header.hiddenCount),
                { stopAfter != null && done >= stopAfter }) { done = it.done }
        return linkedMapOf("done" to count, "capacity" to header.capacity, "header_json" to header.json())
    }

    private fun half(o: Options): Map<String, Any?> {
        val values = floatsIn(o.file("values"))
        return linkedMapOf("bits" to values.map { Half.fromFloat(it) },
                "back" to values.map { java.lang.Float.floatToRawIntBits(Half.round(it)) })
    }
}
