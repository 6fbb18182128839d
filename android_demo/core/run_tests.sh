#!/usr/bin/env bash
# Compile the protocol core and its JUnit4 tests with kotlinc (Debian's 1.3 is enough) and run them.
#   needs: apt-get install -y kotlin junit4 libgoogle-gson-java
# Usage: run_tests.sh               compile what changed, run every *Test class (exit 1 on any failure)
#        run_tests.sh --build-only  compile the core only (what tests/test_kotlin_core.py needs)
# src/main is the core (what the app compiles); src/tool the desktop-only ProtocolTool; src/test JUnit.
# BUILD_DIR overrides the output folder (default: core/build, git-ignored). Each half is rebuilt
# only when its sources change; build/classpath.txt is the classpath that runs ProtocolTool.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="${BUILD_DIR:-$here/build}"
java_dir=/usr/share/java
install_hint="apt-get install -y kotlin junit4 libgoogle-gson-java"

command -v kotlinc >/dev/null || { echo "kotlinc not found: $install_hint" >&2; exit 3; }
command -v java >/dev/null || { echo "java not found: $install_hint" >&2; exit 3; }
gson="$java_dir/gson.jar"
junit="$java_dir/junit4.jar"
for jar in "$gson" "$junit"; do
  [ -e "$jar" ] || { echo "missing $jar: $install_hint" >&2; exit 3; }
done
hamcrest=""
for jar in hamcrest-core.jar hamcrest.jar hamcrest-library.jar; do
  if [ -e "$java_dir/$jar" ]; then hamcrest="$hamcrest:$java_dir/$jar"; fi
done
stdlib=""
for jar in kotlin-stdlib.jar kotlin-stdlib-jdk7.jar kotlin-stdlib-jdk8.jar; do
  if [ -e "$java_dir/$jar" ]; then stdlib="$stdlib:$java_dir/$jar"; fi
done
mkdir -p "$build"

digest() { (cd "$here" && find "$@" -name '*.kt' -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1); }

# compile <name> <classpath> <digest> <sources dir...>: into build/<name>, via a temporary folder
compile() {
  local name="$1" cp="$2" sum="$3"; shift 3
  local out="$build/$name" stamp="$build/$name.sha256"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ] && [ -d "$out" ]; then
    return 0
  fi
  local tmp="$build/.$name.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  echo "kotlinc: compiling $name (about a minute with kotlinc 1.3)" >&2
  local log="$tmp.log"
  # -jvm-target 1.8: bytecode that every JDK >= 8 and the Android toolchain accept
  if ! kotlinc -nowarn -jvm-target 1.8 -cp "$cp" -d "$tmp" $(find "$@" -name '*.kt' | LC_ALL=C sort) >"$log" 2>&1 \
      || grep -q 'error:' "$log"; then
    grep -v -e 'Xverify' "$log" >&2 || true
    rm -rf "$tmp" "$log"
    echo "kotlinc: compiling $name failed" >&2
    exit 1
  fi
  rm -f "$log"
  rm -rf "$out"
  mv "$tmp" "$out"
  echo "$sum" > "$stamp"
}

main_sum="$(digest src/main src/tool)"
compile main "$gson" "$main_sum" "$here/src/main/kotlin" "$here/src/tool/kotlin"
echo "$gson$stdlib:$build/main" > "$build/classpath.txt"
[ "${1:-}" = "--build-only" ] && exit 0

compile test "$gson:$junit$hamcrest:$build/main" "$main_sum-$(digest src/test)" "$here/src/test/kotlin"
classes=$(cd "$build/test" && find . -name '*Test.class' | sed -e 's|^\./||' -e 's|\.class$||' -e 's|/|.|g' | LC_ALL=C sort)
exec java -cp "$gson$stdlib:$junit$hamcrest:$build/main:$build/test" org.junit.runner.JUnitCore $classes
