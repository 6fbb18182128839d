// Versions for the whole build. AGP 8.5 needs Gradle 8.7+ (gradle/wrapper/gradle-wrapper.properties)
// and a JDK 17 to run Gradle.
plugins {
    id("com.android.application") version "8.5.2" apply false
    id("org.jetbrains.kotlin.android") version "1.9.24" apply false
    id("org.jetbrains.kotlin.jvm") version "1.9.24" apply false
}
