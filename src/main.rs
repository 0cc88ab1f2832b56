fn main() {
    println!("align");
}
