// The protocol core as a plain JVM library: no Android, no ONNX Runtime. The same sources are
// compiled and tested without Gradle by core/run_tests.sh (Debian kotlinc 1.3). src/tool
// (ProtocolTool, desktop-only: javax.imageio) is deliberately not part of this source set.
plugins {
    id("org.jetbrains.kotlin.jvm")
}

java {
    sourceCompatibility = JavaVersion.VERSION_1_8
    targetCompatibility = JavaVersion.VERSION_1_8
}

tasks.withType<org.jetbrains.kotlin.gradle.tasks.KotlinCompile>().configureEach {
    kotlinOptions.jvmTarget = "1.8"
}

dependencies {
    api("com.google.code.gson:gson:2.10.1")
    testImplementation("junit:junit:4.13.2")
}
