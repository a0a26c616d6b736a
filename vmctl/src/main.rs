fn main() {
    eprintln!("vmctl: the controller is not implemented yet (issue 3)");
    std::process::exit(2);
}
