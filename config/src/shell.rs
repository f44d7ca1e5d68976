//! Splitting a `command:` string into argv the way a POSIX shell splits words.

/// Splits `text` into words: whitespace separates, `'…'` keeps everything literally, `"…"`
/// keeps everything but lets `\` escape `"`, `\`, `$` and `` ` ``, and a bare `\` escapes the
/// next character. Nothing is expanded: the program is started directly, not through a shell.
pub(crate) fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word can be empty yet present (`''`), so "inside a word" is tracked apart from its text.
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated `'` in command `{text}`")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            // A line continuation inside quotes disappears.
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unterminated `\"` in command `{text}`")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated `\"` in command `{text}`")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err(format!("command `{text}` ends with a lone `\\`")),
            },
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<String> {
        split_words(text).unwrap()
    }

    #[test]
    fn whitespace_separates_words() {
        assert_eq!(split("python3  -m   app"), ["python3", "-m", "app"]);
        assert_eq!(
            split("  ./bootstrap\t--verbose \n"),
            ["./bootstrap", "--verbose"]
        );
        assert!(split("   ").is_empty());
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(
            split("sh -c 'echo hi; exit 1'"),
            ["sh", "-c", "echo hi; exit 1"]
        );
        assert_eq!(split(r#"node "my app.js""#), ["node", "my app.js"]);
        assert_eq!(split(r#"a"b c"d"#), ["ab cd"]);
        assert_eq!(split("x '' y"), ["x", "", "y"]);
    }

    #[test]
    fn backslashes_escape_like_a_shell() {
        assert_eq!(split(r"my\ app"), ["my app"]);
        assert_eq!(split(r#""say \"hi\" \n""#), [r#"say "hi" \n"#]);
        assert_eq!(split(r"'no \escape'"), [r"no \escape"]);
        assert_eq!(split(r#""\$HOME""#), ["$HOME"]);
    }

    #[test]
    fn nothing_is_expanded() {
        assert_eq!(split("echo $HOME *.txt ~"), ["echo", "$HOME", "*.txt", "~"]);
    }

    #[test]
    fn unterminated_quotes_are_errors() {
        assert_eq!(
            split_words("sh -c 'echo"),
            Err("unterminated `'` in command `sh -c 'echo`".to_owned())
        );
        assert!(split_words(r#"node "app.js"#).is_err());
        assert!(split_words(r"trailing \").is_err());
    }
}
