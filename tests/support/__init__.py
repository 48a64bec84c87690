"""Helpers the tests share: consumers, producers, services, proxies, a private RabbitMQ node."""
