"""The operator's REST API (Flask `create_app`); it never imports Docker."""
