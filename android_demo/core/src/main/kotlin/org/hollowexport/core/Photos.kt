package org.hollowexport.core

import java.io.File
import java.security.MessageDigest

/**
 * PROTOCOL.md section 3 step 1 and the photo digest of section 4 (hollow_export/photos.py):
 * which files are photos, their order, their digest, and the pixels the VAE encoder sees.
 */
object Photos {
    val SUFFIXES = listOf(".png", ".jpg", ".jpeg", ".webp", ".bmp")
    const val MIN_PHOTOS = 3

    /** Python's Path.suffix: from the last dot, unless the dot starts the name or ends it. */
    fun suffix(name: String): String {
        val i = name.lastIndexOf('.')
        return if (i > 0 && i < name.length - 1) name.substring(i) else ""
    }

    fun isPhoto(name: String): Boolean {
        val s = suffix(name)
        return SUFFIXES.any { it.equals(s, ignoreCase = true) }
    }

    /** The photo names among `names`, sorted by code point as the reference sorts them. */
    fun select(names: Collection<String>): List<String> = names.filter { isPhoto(it) }.sortedWith(CodePointOrder)

    fun files(folder: File, minimum: Int = MIN_PHOTOS): List<File> {
        if (!folder.isDirectory) throw PhotoException("$folder is not a folder; choose the folder holding your photos")
        val names = select((folder.list() ?: emptyArray()).toList())
        if (names.size < minimum) {
            throw PhotoException("${names.size} photos (${SUFFIXES.joinToString(", ")}) in $folder, need at least " +
                    "$minimum; add 3-10 photos of the subject")
        }
        return names.map { File(folder, it) }
    }

    /** sha256 over, per photo in order: its name in UTF-8, a zero byte, the 32-byte sha256 of its contents. */
    fun digest(files: List<File>): String {
        val h = MessageDigest.getInstance("SHA-256")
        for (f in files) {
            h.update(f.name.toByteArray(Charsets.UTF_8))
            h.update(0.toByte())
            h.update(Hashes.sha256Digest(f))
        }
        return Hashes.hex(h.digest())
    }

    /**
     * ARGB pixels (row-major, alpha ignored, not premultiplied) to the encoder input [3, R, R]:
     * centre-crop to a square, resize to R x R with Pillow's bicubic filter (bit-exact), then
     * pixel / 127.5 - 1 in float32, channels first (RGB).
     */
    fun preprocess(argb: IntArray, width: Int, height: Int, resolution: Int): FloatArray {
        require(argb.size == width * height) { "expected ${width * height} pixels, got ${argb.size}" }
        return preprocess(width, height, resolution) { y, row -> System.arraycopy(argb, y * width, row, 0, width) }
    }

    /**
     * The same, reading one row of ARGB pixels at a time (`readRow(y, row)` fills `row` with row y,
     * e.g. Android's Bitmap.getPixels), so a 12-megapixel photo never sits in memory as ints.
     */
    fun preprocess(width: Int, height: Int, resolution: Int, readRow: (Int, IntArray) -> Unit): FloatArray {
        val side = Math.min(width, height)
        val left = (width - side) / 2
        val top = (height - side) / 2
        val planes = Array(3) { ByteArray(side * side) }
        val row = IntArray(width)
        for (y in 0 until side) {
            readRow(y + top, row)
            for (x in 0 until side) {
                val p = row[x + left]
                planes[0][y * side + x] = (p ushr 16).toByte()
                planes[1][y * side + x] = (p ushr 8).toByte()
                planes[2][y * side + x] = p.toByte()
            }
        }
        val resized = if (side == resolution) planes else PilBicubic.resize(planes, side, side, resolution, resolution)
        val n = resolution * resolution
        val out = FloatArray(3 * n)
        for (c in 0 until 3) for (i in 0 until n) out[c * n + i] = (resized[c][i].toInt() and 0xff).toFloat() / 127.5f - 1.0f
        return out
    }
}

/**
 * Pillow's BICUBIC resampling of 8-bit images (libImaging/Resample.c: precompute_coeffs,
 * normalize_coeffs_8bpc, ImagingResampleHorizontal/Vertical_8bpc, ImagingResampleInner), so a
 * phone feeds the VAE the very pixels the Python reference does. Written from the algorithm:
 * separable convolution with the a = -0.5 cubic kernel widened by the scale when shrinking,
 * coefficients in 22-bit fixed point, horizontal pass first over only the rows the vertical
 * pass needs, clipping to 0..255 after each pass.
 */
object PilBicubic {
    private const val PRECISION_BITS = 32 - 8 - 2
    private const val A = -0.5
    private const val SUPPORT = 2.0

    private fun filter(x0: Double): Double {
        val x = if (x0 < 0.0) -x0 else x0
        if (x < 1.0) return ((A + 2.0) * x - (A + 3.0)) * x * x + 1
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * A
        return 0.0
    }

    class Coefficients(val ksize: Int, val bounds: IntArray, val kk: IntArray)

    fun coefficients(inSize: Int, in0: Float, in1: Float, outSize: Int): Coefficients {
        val scale = (in1 - in0).toDouble() / outSize
        val filterscale = if (scale < 1.0) 1.0 else scale
        val support = SUPPORT * filterscale
        val ksize = Math.ceil(support).toInt() * 2 + 1
        val pre = DoubleArray(outSize * ksize)
        val bounds = IntArray(outSize * 2)
        for (xx in 0 until outSize) {
            val center = in0 + (xx + 0.5) * scale
            var ww = 0.0
            val ss = 1.0 / filterscale
            var xmin = (center - support + 0.5).toInt()
            if (xmin < 0) xmin = 0
            var xmax = (center + support + 0.5).toInt()
            if (xmax > inSize) xmax = inSize
            xmax -= xmin
            for (x in 0 until xmax) {
                val w = filter((x + xmin - center + 0.5) * ss)
                pre[xx * ksize + x] = w
                ww += w
            }
            for (x in 0 until xmax) if (ww != 0.0) pre[xx * ksize + x] /= ww
            bounds[xx * 2] = xmin
            bounds[xx * 2 + 1] = xmax
        }
        val one = (1 shl PRECISION_BITS).toDouble()
        val kk = IntArray(pre.size) { if (pre[it] < 0) (-0.5 + pre[it] * one).toInt() else (0.5 + pre[it] * one).toInt() }
        return Coefficients(ksize, bounds, kk)
    }

    private fun clip8(v: Int): Int {
        val s = v shr PRECISION_BITS
        return if (s < 0) 0 else if (s > 255) 255 else s
    }

    /** Resize 8-bit planes (one ByteArray per channel, row-major) from inW x inH to outW x outH. */
    fun resize(planes: Array<ByteArray>, inW: Int, inH: Int, outW: Int, outH: Int): Array<ByteArray> {
        val needH = outW != inW
        val needV = outH != inH
        val vert = coefficients(inH, 0f, inH.toFloat(), outH)
        val first = vert.bounds[0]
        val last = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1]
        var cur = planes
        var curW = inW
        var curH = inH
        val vBounds = vert.bounds.copyOf()
        if (needH) {
            val hor = coefficients(inW, 0f, inW.toFloat(), outW)
            for (i in 0 until outH) vBounds[i * 2] -= first
            val rows = last - first
            cur = Array(planes.size) { c ->
                val src = planes[c]
                val dst = ByteArray(outW * rows)
                for (yy in 0 until rows) {
                    val row = (yy + first) * inW
                    for (xx in 0 until outW) {
                        val xmin = hor.bounds[xx * 2]
                        val xmax = hor.bounds[xx * 2 + 1]
                        val k = xx * hor.ksize
                        var ss = 1 shl (PRECISION_BITS - 1)
                        for (x in 0 until xmax) ss += (src[row + x + xmin].toInt() and 0xff) * hor.kk[k + x]
                        dst[yy * outW + xx] = clip8(ss).toByte()
                    }
                }
                dst
            }
            curW = outW
            curH = rows
        }
        if (needV) {
            val src = cur
            val w = curW
            cur = Array(src.size) { c ->
                val dst = ByteArray(w * outH)
                for (yy in 0 until outH) {
                    val ymin = vBounds[yy * 2]
                    val ymax = vBounds[yy * 2 + 1]
                    val k = yy * vert.ksize
                    for (xx in 0 until w) {
                        var ss = 1 shl (PRECISION_BITS - 1)
                        for (y in 0 until ymax) ss += (src[c][(y + ymin) * w + xx].toInt() and 0xff) * vert.kk[k + y]
                        dst[yy * w + xx] = clip8(ss).toByte()
                    }
                }
                dst
            }
            curH = outH
        }
        check(curH == outH && curW == outW)
        return if (cur === planes) Array(planes.size) { planes[it].copyOf() } else cur
    }
}
