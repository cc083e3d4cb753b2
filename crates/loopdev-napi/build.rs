fn main() {
    // Without nodelete the addon is unloaded when a worker thread exits while node still holds pointers
    // into it (finalizers, async work), and the process segfaults.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
