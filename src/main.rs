mod cmd;
mod error;
mod recipe;
mod smoke;

fn main() {
    cmd::install_signal_handlers();
    for path in std::env::args().skip(1) {
        match recipe::load(std::path::Path::new(&path)) {
            Ok(r) => println!("{r:#?}"),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(error::exit_code(&e));
            }
        }
    }
}
