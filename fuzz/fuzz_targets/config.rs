//! The config file (`/etc/imagestream/config.toml`): TOML parsing, unknown keys, and the
//! validation of every setting. What is accepted prints (`imagestream config`) as a file that
//! reads back to the same configuration.
#![no_main]

use imagestream::config::{parse, Config, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = parse(text) else {
        return;
    };
    let Ok(config) = Config::build(Some(file), Overrides::default()) else {
        return;
    };
    assert!(config.history_limit >= 1 && config.cache_max_bytes > 0);
    config
        .mirror_addr()
        .expect("a valid config has a mirror address");
    let printed = toml::to_string(&config)
        .unwrap_or_else(|e| panic!("a valid config does not print: {e}: {config:?}"));
    let file = parse(&printed).unwrap_or_else(|e| panic!("printed config {printed:?}: {e}"));
    let again = Config::build(Some(file), Overrides::default())
        .unwrap_or_else(|e| panic!("printed config {printed:?} is invalid: {e}"));
    assert_eq!(again, config, "{printed}");
});
