"""Sandbox backends behind one interface (`base.Runtime`)."""
