package org.hollowexport.demo

import android.app.ActivityManager
import android.content.Intent
import android.net.Uri
import android.os.Bundle
import android.os.Handler
import android.os.Looper
import android.widget.Button
import android.widget.CheckBox
import android.widget.EditText
import android.widget.TextView
import android.widget.Toast
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.core.content.FileProvider
import androidx.work.WorkInfo
import androidx.work.WorkManager
import org.hollowexport.core.BufferHeader
import org.hollowexport.core.HollowException
import org.hollowexport.core.LoraExport
import org.hollowexport.core.MemoryFloor
import org.hollowexport.core.RunFolder
import java.io.File
import java.util.concurrent.Executors

/**
 * One screen: bundle, photos, start/stop, progress (step, loss, ETA, memory), export and share.
 * Everything slow runs on a background thread or in WorkManager; the protocol is in :core.
 */
class MainActivity : AppCompatActivity() {
    private lateinit var files: AppFiles
    private val background = Executors.newSingleThreadExecutor()
    private val main = Handler(Looper.getMainLooper())

    private lateinit var bundleStatus: TextView
    private lateinit var photoStatus: TextView
    private lateinit var progress: TextView
    private lateinit var samples: EditText
    private lateinit var steps: EditText
    private lateinit var fp16: CheckBox
    private lateinit var waitIdle: CheckBox

    private val pickBundle = registerForActivityResult(ActivityResultContracts.OpenDocumentTree()) { tree: Uri? ->
        if (tree != null) work("copying the bundle") {
            files.copyBundle(tree) { name, bytes -> post { bundleStatus.text = "copying $name: ${mib(bytes)}" } }
            describeBundle(verify = true)
        }
    }

    private val pickPhotos = registerForActivityResult(ActivityResultContracts.OpenMultipleDocuments()) { uris: List<Uri> ->
        if (uris.isNotEmpty()) work("copying photos") {
            val names = files.copyPhotos(uris)
            post { photoStatus.text = photoText(names.size) }
        }
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        files = AppFiles(this)
        bundleStatus = findViewById(R.id.bundleStatus)
        photoStatus = findViewById(R.id.photoStatus)
        progress = findViewById(R.id.progress)
        samples = findViewById(R.id.samples)
        steps = findViewById(R.id.steps)
        fp16 = findViewById(R.id.fp16)
        waitIdle = findViewById(R.id.waitIdle)

        findViewById<Button>(R.id.chooseBundle).setOnClickListener { pickBundle.launch(null) }
        findViewById<Button>(R.id.checkBundle).setOnClickListener {
            work("checking the bundle") { describeBundle(verify = true) }
        }
        findViewById<Button>(R.id.choosePhotos).setOnClickListener { pickPhotos.launch(arrayOf("image/*")) }
        findViewById<Button>(R.id.start).setOnClickListener { start() }
        findViewById<Button>(R.id.stop).setOnClickListener {
            Jobs.stop(this)
            toast("stopping: the current step finishes and a checkpoint is saved")
        }
        findViewById<Button>(R.id.export).setOnClickListener { exportAndShare() }
        findViewById<Button>(R.id.reset).setOnClickListener {
            Jobs.stop(this)
            work("resetting") { files.reset(); post { progress.text = "buffer and run deleted" } }
        }

        photoStatus.text = photoText(files.photoCount())
        work("reading the bundle") { describeBundle(verify = false) }
        WorkManager.getInstance(this).getWorkInfosForUniqueWorkLiveData(Jobs.NAME).observe(this) { infos ->
            progress.text = describeWork(infos)
        }
    }

    override fun onDestroy() {
        background.shutdown()
        super.onDestroy()
    }

    private fun start() {
        val n = samples.text.toString().toIntOrNull()
        val s = steps.text.toString().toLongOrNull()
        if (n == null || n < 1 || s == null || s < 1) {
            toast("enter the number of samples and steps")
            return
        }
        if (files.photoCount() < 3) {
            toast("choose at least 3 photos first")
            return
        }
        Jobs.start(this, n, s, fp16.isChecked, waitIdle.isChecked)
        toast(if (waitIdle.isChecked) "queued: runs while charging and idle" else "queued: runs while charging")
    }

    /** Bundle id, sizes, and the parameter-memory floor against this phone's RAM. */
    private fun describeBundle(verify: Boolean) {
        if (!File(files.bundle, "manifest.json").isFile) {
            post { bundleStatus.text = "no bundle yet: copy one, or adb push it to ${files.bundle}" }
            return
        }
        val bundle = if (verify) {
            files.openBundle { name, done, total -> post { bundleStatus.text = "checking $name: ${mib(done)} of ${mib(total)}" } }
        } else {
            org.hollowexport.core.Bundle.open(files.bundle, verify = false)
        }
        val floor = MemoryFloor(bundle.memory)
        val info = ActivityManager.MemoryInfo()
        (getSystemService(ACTIVITY_SERVICE) as ActivityManager).getMemoryInfo(info)
        val text = buildString {
            append("bundle ${bundle.id.take(12)} (${if (verify) "verified" else "not checked yet"})\n")
            append("resolution ${bundle.hyper.resolution}, LoRA rank ${bundle.hyper.rankText}, ${bundle.lora.size} tensors\n")
            append("weights alone: collection ${mib(floor.collection)}, training ${mib(floor.training)}; ")
            append("this phone has ${mib(info.totalMem)} RAM")
            if (floor.training > info.totalMem / 2) append("\nwarning: training weights exceed half this phone's RAM")
        }
        post {
            bundleStatus.text = text
            if (samples.text.isEmpty()) samples.setText(bundle.hyper.samples.toString())
            if (steps.text.isEmpty()) steps.setText(bundle.hyper.steps.toString())
        }
    }

    private fun describeWork(infos: List<WorkInfo>): String {
        val sb = StringBuilder()
        val running = infos.firstOrNull { it.state == WorkInfo.State.RUNNING }
        if (running != null) {
            val p = running.progress
            val phase = p.getString(Jobs.KEY_PHASE) ?: "starting"
            sb.append(phase)
            val total = p.getLong(Jobs.KEY_TOTAL, 0)
            if (total > 0) sb.append(": ${p.getLong(Jobs.KEY_DONE, 0)} / $total")
            if (phase == "training") {
                sb.append(String.format("\nloss %.5f", p.getFloat(Jobs.KEY_LOSS, Float.NaN)))
                val eta = p.getLong(Jobs.KEY_ETA, -1)
                if (eta >= 0) sb.append("\ncompute time left ~${eta / 60000} min (runs only while charging/idle)")
            }
            val rss = p.getLong(Jobs.KEY_RSS, -1)
            if (rss > 0) sb.append("\nmemory in use ${mib(rss)} (RSS)")
        } else if (infos.any { it.state == WorkInfo.State.ENQUEUED || it.state == WorkInfo.State.BLOCKED }) {
            sb.append("waiting for the constraints (charging${if (waitIdle.isChecked) ", idle" else ""})")
        }
        infos.firstOrNull { it.state == WorkInfo.State.FAILED }?.outputData?.getString(Jobs.KEY_ERROR)?.let {
            sb.append("\nfailed: $it")
        }
        sb.append("\n").append(savedState())
        return sb.toString()
    }

    /** What is on disk, whatever WorkManager is doing. */
    private fun savedState(): String {
        val lines = ArrayList<String>()
        try {
            if (files.buffer.isFile) {
                val (header, start) = BufferHeader.read(files.buffer)
                val n = (files.buffer.length() - start) / header.recordBytes
                lines.add("buffer: $n / ${header.capacity} samples (${header.dtype})")
            }
            val p = RunFolder(files.run).readProgress()
            if (p != null) {
                val last = p.losses.takeLast(10)
                lines.add("saved: step ${p.step}, ${p.checkpoint}" +
                        if (last.isNotEmpty()) String.format(", mean loss (last 10) %.5f", last.average()) else "")
            }
        } catch (err: HollowException) {
            lines.add(err.message ?: err.toString())
        }
        return lines.joinToString("\n")
    }

    private fun exportAndShare() = work("exporting") {
        val bundle = org.hollowexport.core.Bundle.open(files.bundle, verify = false)
        val record = LoraExport.export(bundle, files.run, files.export)
        val authority = "$packageName.files"
        val uris = arrayListOf(
                FileProvider.getUriForFile(this, authority, File(files.export, LoraExport.FILE)),
                FileProvider.getUriForFile(this, authority, File(files.export, LoraExport.RECORD)))
        val share = Intent(Intent.ACTION_SEND_MULTIPLE).apply {
            type = "application/octet-stream"
            putParcelableArrayListExtra(Intent.EXTRA_STREAM, uris)
            addFlags(Intent.FLAG_GRANT_READ_URI_PERMISSION)
        }
        post {
            progress.text = "exported ${record["tensors"]} tensors from ${record["checkpoint"]}, sha256 " +
                    "${(record["sha256"] as String).take(16)}…\n${files.export}"
            startActivity(Intent.createChooser(share, "Send the LoRA"))
        }
    }

    private fun work(what: String, body: () -> Unit) {
        background.execute {
            try {
                body()
            } catch (err: HollowException) {
                post { toast(err.message ?: what); progress.append("\n${err.message}") }
            } catch (err: Exception) {
                post { toast("$what failed: $err") }
            }
        }
    }

    private fun post(body: () -> Unit) {
        main.post(body)
    }

    private fun toast(text: String) = Toast.makeText(this, text, Toast.LENGTH_LONG).show()

    private fun photoText(n: Int) = if (n >= 3) "$n photos chosen" else "$n photos: choose 3–10 of the subject"

    private fun mib(bytes: Long) = String.format("%.0f MiB", bytes / 1048576.0)
}
