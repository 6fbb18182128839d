package org.hollowexport.core

import java.io.BufferedOutputStream
import java.io.File
import java.io.FileOutputStream
import java.io.IOException
import java.io.OutputStream
import java.nio.channels.FileChannel
import java.nio.file.AtomicMoveNotSupportedException
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import java.nio.file.StandardOpenOption

/**
 * Files that are never half-written (hollow_export/store.py): write to a temporary name in the
 * same folder, fsync, rename over the target, fsync the folder. A kill at any moment leaves
 * either the old file or the new one under the final name.
 */
object AtomicFiles {
    fun write(target: File, body: (OutputStream) -> Unit) {
        val dir = target.absoluteFile.parentFile
        if (!dir.isDirectory && !dir.mkdirs()) throw IOException("cannot create folder $dir")
        val tmp = File.createTempFile(".${target.name}.", ".tmp", dir)
        try {
            FileOutputStream(tmp).use { raw ->
                val out = BufferedOutputStream(raw, 1 shl 16)
                body(out)
                out.flush()
                raw.channel.force(true)
            }
            move(tmp, target)
        } catch (err: Throwable) {
            tmp.delete()
            throw err
        }
    }

    fun writeBytes(target: File, bytes: ByteArray) = write(target) { it.write(bytes) }

    fun writeText(target: File, text: String) = writeBytes(target, text.toByteArray(Charsets.UTF_8))

    /** rename(2) semantics: replaces the target; then the folder entry is made durable. */
    fun move(source: File, target: File) {
        try {
            Files.move(source.toPath(), target.toPath(), StandardCopyOption.ATOMIC_MOVE)
        } catch (err: AtomicMoveNotSupportedException) {
            Files.move(source.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING)
        }
        fsyncDir(target.absoluteFile.parentFile)
    }

    fun fsync(file: File) {
        FileChannel.open(file.toPath(), StandardOpenOption.WRITE).use { it.force(true) }
    }

    /** Best effort: Linux (and Android) can fsync a directory opened read-only; other systems may refuse. */
    fun fsyncDir(dir: File) {
        try {
            FileChannel.open(dir.toPath(), StandardOpenOption.READ).use { it.force(true) }
        } catch (err: IOException) {
            // not supported here: the rename itself is still atomic
        }
    }
}
