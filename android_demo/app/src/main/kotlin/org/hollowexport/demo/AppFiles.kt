package org.hollowexport.demo

import android.content.Context
import android.net.Uri
import android.provider.DocumentsContract
import android.provider.OpenableColumns
import org.hollowexport.core.AtomicFiles
import org.hollowexport.core.Bundle
import org.hollowexport.core.BundleException
import org.hollowexport.core.BundleFiles
import org.hollowexport.core.Hashes
import org.hollowexport.core.Photos
import java.io.File
import java.io.IOException

/**
 * Where everything lives: the app-specific external folder, which `adb push`/`adb pull` reach
 * without root (/sdcard/Android/data/org.hollowexport.demo/files/):
 *   bundle/        the bundle (adb push, or copied here from a folder chosen with the system picker)
 *   photos/        the chosen photos (copied, keeping their names: their order and digest depend on them)
 *   buffer.bin     the collected samples
 *   run/           checkpoints and progress.json
 *   export/        lora.safetensors + lora.json
 */
class AppFiles(context: Context) {
    private val app = context.applicationContext
    val root: File = app.getExternalFilesDir(null) ?: app.filesDir
    val bundle = File(root, "bundle")
    val photos = File(root, "photos")
    val buffer = File(root, "buffer.bin")
    val run = File(root, "run")
    val export = File(root, "export")
    private val verified = File(app.filesDir, "bundle.verified")

    /**
     * The bundle, hash-checked (PROTOCOL.md section 1). Hashing a multi-GB bundle takes a minute,
     * so a successful check is remembered against the files' sizes and modification times and
     * repeated only when they change.
     */
    fun openBundle(onProgress: ((String, Long, Long) -> Unit)? = null): Bundle {
        val unchecked = Bundle.open(bundle, verify = false)
        val fingerprint = fingerprint(unchecked)
        if (verified.isFile && verified.readText() == fingerprint) return unchecked
        unchecked.verify(onProgress)
        AtomicFiles.writeText(verified, fingerprint)
        return unchecked
    }

    private fun fingerprint(b: Bundle): String = Hashes.sha256((listOf(b.id) + b.files.map { f ->
        val file = b.file(f.name)
        "${f.name}:${file.length()}:${file.lastModified()}"
    }).joinToString("\n").toByteArray())

    fun forgetVerification() {
        verified.delete()
    }

    /** Copy the files of a folder chosen with ACTION_OPEN_DOCUMENT_TREE into bundle/, replacing it whole. */
    fun copyBundle(tree: Uri, onProgress: (String, Long) -> Unit) {
        val resolver = app.contentResolver
        val children = DocumentsContract.buildChildDocumentsUriUsingTree(tree, DocumentsContract.getTreeDocumentId(tree))
        val entries = ArrayList<Pair<String, String>>()  // (document id, name)
        resolver.query(children, arrayOf(DocumentsContract.Document.COLUMN_DOCUMENT_ID,
                DocumentsContract.Document.COLUMN_DISPLAY_NAME, DocumentsContract.Document.COLUMN_MIME_TYPE),
                null, null, null)?.use { c ->
            while (c.moveToNext()) {
                if (c.getString(2) != DocumentsContract.Document.MIME_TYPE_DIR) entries.add(c.getString(0) to c.getString(1))
            }
        }
        if (entries.none { it.second == BundleFiles.MANIFEST }) {
            throw BundleException("the chosen folder has no ${BundleFiles.MANIFEST}; choose the folder `hollow-export build` wrote")
        }
        val incoming = File(root, "bundle.incoming")
        incoming.deleteRecursively()
        incoming.mkdirs()
        var copied = 0L
        for ((id, name) in entries) {
            val input = resolver.openInputStream(DocumentsContract.buildDocumentUriUsingTree(tree, id))
                    ?: throw IOException("cannot read $name")
            input.use { src ->
                File(incoming, name).outputStream().use { dst ->
                    val block = ByteArray(1 shl 20)
                    while (true) {
                        val n = src.read(block)
                        if (n < 0) break
                        dst.write(block, 0, n)
                        copied += n
                        onProgress(name, copied)
                    }
                    dst.fd.sync()
                }
            }
        }
        val old = File(root, "bundle.old")
        old.deleteRecursively()
        if (bundle.exists() && !bundle.renameTo(old)) throw IOException("cannot replace $bundle")
        if (!incoming.renameTo(bundle)) throw IOException("cannot move the copied bundle into $bundle")
        old.deleteRecursively()
        forgetVerification()
    }

    /** Copy chosen photos into photos/ under their display names (replacing earlier choices). */
    fun copyPhotos(uris: List<Uri>): List<String> {
        val resolver = app.contentResolver
        photos.deleteRecursively()
        photos.mkdirs()
        val names = ArrayList<String>()
        for ((i, uri) in uris.withIndex()) {
            var name = resolver.query(uri, arrayOf(OpenableColumns.DISPLAY_NAME), null, null, null)?.use { c ->
                if (c.moveToFirst()) c.getString(0) else null
            } ?: "photo_$i.jpg"
            name = name.replace('/', '_')
            if (!Photos.isPhoto(name)) name = "$name.jpg"
            while (name in names) name = "copy_$name"
            resolver.openInputStream(uri)?.use { src -> File(photos, name).outputStream().use { src.copyTo(it) } }
                    ?: throw IOException("cannot read $uri")
            names.add(name)
        }
        return Photos.select(names)
    }

    fun photoCount(): Int = Photos.select((photos.list() ?: emptyArray()).toList()).size

    /** Start over: the buffer and the run folder (the bundle and photos stay). */
    fun reset() {
        buffer.delete()
        run.deleteRecursively()
        export.deleteRecursively()
    }
}
