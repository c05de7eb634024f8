// Package health decides, from delivery outcomes alone, when a webhook
// destination is quarantined, probed, released or paused.
//
// It is the health monitor's domain logic and imports neither NATS nor gRPC:
// a Window summarises one destination's recent outcomes, a Policy says when
// a window is bad enough to quarantine, and a Machine holds every
// destination's state and turns outcomes, clock ticks, probe results and
// operator actions into eventv1.Decision values for the adapters to store
// and publish. Time is always passed in, so every rule is testable with a
// simulated clock.
package health
