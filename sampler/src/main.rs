fn main() {
    println!("sampler: coming with issue 5");
}
