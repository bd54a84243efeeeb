//! Writes the documentation-prefix GeoIP2-City test database used by bench/dns.sh and the
//! `meridian dns explain` examples: `cargo run -p geodns --example write_test_mmdb -- OUT.mmdb`.

use geodns::mmdb_writer::{Value, write};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .ok_or("usage: write_test_mmdb OUT.mmdb")?;
    let rows = [
        ("192.0.2.0/25", "EU", "DE", "Frankfurt", 50.11, 8.68),
        ("192.0.2.128/25", "EU", "NL", "Amsterdam", 52.37, 4.90),
        ("198.51.100.0/24", "NA", "US", "Ashburn", 39.04, -77.49),
        ("203.0.113.0/24", "AS", "SG", "Singapore", 1.29, 103.85),
        ("2001:db8::/48", "AS", "JP", "Tokyo", 35.68, 139.69),
        ("2001:db8:1::/48", "SA", "BR", "Sao Paulo", -23.55, -46.63),
    ];
    let mut nets = Vec::new();
    for (net, continent, country, city, lat, lon) in rows {
        nets.push((
            net.parse()?,
            Value::geoip2_city(continent, country, city, lat, lon),
        ));
    }
    std::fs::write(&out, write("GeoIP2-City", &nets)?)?;
    println!("{out}");
    Ok(())
}
