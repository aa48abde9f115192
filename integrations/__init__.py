"""Framework bridges, installed as ``cupycodec.integrations``. Empty on purpose: import a bridge by name."""
