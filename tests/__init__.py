"""The test suite (a package, so that pytest puts the repository root, not tests/, on sys.path: tests/vision
and friends would otherwise shadow the real vision, language and multimodal packages as namespace packages)."""
