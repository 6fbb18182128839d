package org.hollowexport.core

import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest

/** sha256 as PROTOCOL.md uses it: the lowercase hex digest of a file's bytes. */
object Hashes {
    private const val HEX = "0123456789abcdef"

    fun hex(bytes: ByteArray): String {
        val out = StringBuilder(bytes.size * 2)
        for (b in bytes) {
            val v = b.toInt() and 0xff
            out.append(HEX[v ushr 4]).append(HEX[v and 15])
        }
        return out.toString()
    }

    fun sha256(bytes: ByteArray): String = hex(MessageDigest.getInstance("SHA-256").digest(bytes))

    /** The raw 32-byte digest of a file, read in 1 MiB blocks (bundles hold multi-GB files). */
    fun sha256Digest(file: File, onBytes: ((Long) -> Unit)? = null): ByteArray {
        val digest = MessageDigest.getInstance("SHA-256")
        val block = ByteArray(1 shl 20)
        FileInputStream(file).use { input ->
            while (true) {
                val n = input.read(block)
                if (n < 0) break
                digest.update(block, 0, n)
                if (onBytes != null) onBytes(n.toLong())
            }
        }
        return digest.digest()
    }

    fun sha256(file: File, onBytes: ((Long) -> Unit)? = null): String = hex(sha256Digest(file, onBytes))
}
