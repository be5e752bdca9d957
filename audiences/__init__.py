"""Audiences: rules, consent-aware eligibility, membership, the outbox and destination
adapters. Lands with the audiences and delivery features."""
