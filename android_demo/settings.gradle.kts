// Hollowed Net demo: :core is the plain-Kotlin protocol core (also built and tested with
// core/run_tests.sh, no Gradle needed), :app the thin Android/ONNX Runtime layer.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "hollow-export-demo"
include(":core", ":app")
