// Package health decides, from delivery outcomes alone, when a webhook
// destination is quarantined, probed and released.
//
// It is the health monitor's domain logic and imports neither NATS nor gRPC:
// a Window summarises one destination's recent outcomes, a Policy says when
// a window is bad enough to quarantine, and a Machine holds every
// destination's state and turns outcomes, clock ticks and probe results
// into eventv1.Decision values for the adapters to store and publish.
// Operators' decisions (pause, resume) are made by the admin API and reach
// the Machine through Load, like any stored decision; the Machine honours
// them (a paused destination is never decided on or probed). Time is always passed in, so every rule is testable with a
// simulated clock.
package health
