package org.hollowexport.core

/**
 * A problem the user can fix: the message names the file and says what to do (PROTOCOL.md asks
 * every refusal to name the file). The Android layer shows it as is.
 */
open class HollowException(message: String, cause: Throwable? = null) : RuntimeException(message, cause)

/** A bundle that is incomplete, of another version or fails a hash. */
class BundleException(message: String, cause: Throwable? = null) : HollowException(message, cause)

/** A buffer file that is not one, belongs elsewhere, is unfinished or damaged. */
class BufferException(message: String, cause: Throwable? = null) : HollowException(message, cause)

/** A run folder, checkpoint or disk problem while training or exporting. */
class RunException(message: String, cause: Throwable? = null) : HollowException(message, cause)

/** Photos that cannot be used. */
class PhotoException(message: String, cause: Throwable? = null) : HollowException(message, cause)
