//! Writes the OpenAPI documents evoke serves into a directory, laid out as
//! the URLs name them (`v2.json`, `v3.json`, `v3/api/v1.json`, ...), so
//! they can be inspected or served by a stand-in server to a real kubectl.
//!
//! `cargo run -p evoke-types --example openapi_dump -- /tmp/openapi`

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "openapi".into()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("v2.json"), evoke_types::openapi::v2().to_string())?;
    let index = evoke_types::openapi::v3_index();
    std::fs::write(dir.join("v3.json"), index.to_string())?;
    for name in index["paths"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
    {
        if let Some(doc) = evoke_types::openapi::v3(name) {
            let path = dir.join("v3").join(format!("{name}.json"));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, doc.to_string())?;
        }
    }
    println!("wrote {}", dir.display());
    Ok(())
}
