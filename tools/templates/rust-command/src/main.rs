//! A thaw function as a WASI command: `main` runs in a fresh instance for every request, with
//! the request on stdin and the response on stdout. An exit code other than 0 ends the request
//! with that code. With `thaw pack --init-until-read`, what `main` does before it reads stdin
//! runs once and is kept in the snapshot.

use std::io::Read;

fn main() {
    let mut request = String::new();
    std::io::stdin().read_to_string(&mut request).expect("the request");
    let name = request.trim();
    if name.is_empty() {
        eprintln!("send a name");
        std::process::exit(2);
    }
    println!("hello, {name}");
}
