package org.hollowexport.demo

import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.graphics.ColorSpace
import org.hollowexport.core.PhotoException
import org.hollowexport.core.Photos
import java.io.File

/**
 * Decodes a photo and hands its rows to the core's preprocessing (centre crop, Pillow-exact
 * bicubic resize, scaling). Not premultiplied, so pixels with alpha keep their colour values as
 * Pillow's convert("RGB") does; EXIF orientation is ignored, as the Python reference ignores it.
 * (Decoders differ: JPEG decoding may differ from Pillow's by a level here and there; PNG is exact.)
 */
object PhotoDecoder {
    fun decode(file: File, resolution: Int): FloatArray {
        val options = BitmapFactory.Options().apply {
            inPreferredConfig = Bitmap.Config.ARGB_8888
            inPremultiplied = false
            inScaled = false
            inPreferredColorSpace = ColorSpace.get(ColorSpace.Named.SRGB)
        }
        val bitmap = BitmapFactory.decodeFile(file.path, options)
                ?: throw PhotoException("${file.name} is not a readable image; remove it or replace it")
        try {
            val w = bitmap.width
            return Photos.preprocess(w, bitmap.height, resolution) { y, row -> bitmap.getPixels(row, 0, w, 0, y, w, 1) }
        } finally {
            bitmap.recycle()
        }
    }
}
