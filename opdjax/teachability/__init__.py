"""The release rule (../shared/design/RELEASE_RULE.md): teacher scoring, margins, sentence
segments, the BIC change-point scan, release weights, and the pictures of what it decided."""
