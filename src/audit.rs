//! What crosses the edge about a request: error messages capped in length (a message names the
//! bad value, and a value can be megabytes), and audit records (who changed or was refused what)
//! as structured log records with target `imagestream::audit`.

/// Longest error message sent back to a client; longer ones are cut with a note.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// `message`, cut to [`MAX_ERROR_MESSAGE`] bytes on a character boundary.
pub fn cap(message: String) -> String {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &message[..end], message.len())
}

/// The error and its sources, as one line (each source once).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// A gRPC status with a capped message.
pub fn status(code: tonic::Code, message: impl Into<String>) -> tonic::Status {
    tonic::Status::new(code, cap(message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_long_messages() {
        assert_eq!(cap("short".into()), "short");
        let long = "é".repeat(2000);
        let capped = cap(long);
        assert!(capped.len() < MAX_ERROR_MESSAGE + 64);
        assert!(capped.ends_with("(4000 bytes in all)"));
    }
}
